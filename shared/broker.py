"""Connecting to RabbitMQ: one place for URLs, TLS, timeouts and the error users see."""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any, TypeVar
from urllib.parse import parse_qs, parse_qsl, unquote, urlencode, urlparse, urlunparse

import aio_pika
import pika
from aio_pika.exceptions import InvalidFrameError, ProbableAuthenticationError

from shared.errors import ConfigError, TransientError, redact
from shared.settings import Settings

_E = TypeVar("_E", bound=BaseException)

HEARTBEAT_S = 30
# How long the diagnosis of a reset TLS connection waits for the broker's alert (`_tls_alert`).
_TLS_ALERT_WAIT_S = 3


class BrokerUnavailable(TransientError):
    """No broker answered at the configured URL."""


class BrokerRefused(ConfigError):
    """A broker answered but refused the connection as configured: its TLS certificate, the
    login or the virtual host. Trying again will not help until the configuration changes."""


# OpenSSL's verify codes for a certificate that does not name the host or address connected to.
_NAME_MISMATCHES = (62, 64)
# The query parameters of an amqps:// URL that name TLS files (aiormq's names): the CA bundle
# that signed the broker's certificate, and this client's certificate and key, for a broker
# that asks clients for one (mutual TLS).
TLS_FILE_PARAMETERS = ("cafile", "certfile", "keyfile")
# What OpenSSL reports when the broker refuses the client's certificate, or the lack of one.
_CLIENT_CERTIFICATE_REFUSALS = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN")


def tls_context(url: str) -> ssl.SSLContext | None:
    """The TLS context for the broker at `url`: None for ``amqp://``. For ``amqps://`` it
    trusts the system's certificates (or those of the file ``SSL_CERT_FILE`` names), or only
    the URL's ``cafile``, and presents the client certificate of its ``certfile`` and
    ``keyfile``. Both client libraries (aiormq and pika) connect with it.

    Raises `ConfigError` in one line when a file the URL names cannot be used.
    """
    parsed = urlparse(url)
    if parsed.scheme != "amqps":
        return None
    files = dict(parse_qsl(parsed.query))
    cafile, certfile, keyfile = (files.get(name) for name in TLS_FILE_PARAMETERS)
    try:
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot use cafile={cafile} of TICKQ_AMQP_URL: {_file_problem(exc)}") from None
    if keyfile and not certfile:
        raise ConfigError("TICKQ_AMQP_URL names a keyfile without a certfile: name the client certificate too")
    if certfile:
        try:
            context.load_cert_chain(certfile, keyfile)
        except (OSError, ssl.SSLError) as exc:
            named = f"certfile={certfile}" + (f" and keyfile={keyfile}" if keyfile else "")
            raise ConfigError(f"cannot use the client certificate {named} of TICKQ_AMQP_URL: "
                              f"{_file_problem(exc)}") from None
    return context


def without_tls_files(url: str) -> str:
    """`url` without the query parameters that name TLS files (for pika, which knows none of
    them: `tls_context` gives it their context)."""
    parsed = urlparse(url)
    kept = [(k, v) for k, v in parse_qsl(parsed.query, keep_blank_values=True) if k not in TLS_FILE_PARAMETERS]
    return urlunparse(parsed._replace(query=urlencode(kept)))


def _file_problem(exc: OSError | ssl.SSLError) -> str:
    """Why a certificate or key file could not be used, briefly."""
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "KEY_VALUES_MISMATCH":
            return "the key does not belong to the certificate"
        return "not a PEM certificate or key OpenSSL can read" + (f" ({exc.reason})" if exc.reason else "")
    return exc.strerror or type(exc).__name__


def _cause(exc: BaseException, kind: type[_E]) -> _E | None:
    """`exc` or the first exception of type `kind` in its chain (aiormq chains the socket's)."""
    seen: BaseException | None = exc
    for _ in range(8):  # a chain is short; this bounds a cyclic one
        if seen is None or isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _refusal(exc: BaseException, url: str) -> BrokerRefused | None:
    """What to tell a user whose connection to the broker at `url` failed, when a broker
    answered and refused it; None when no broker answered."""
    safe_url, parsed = redact(url), urlparse(url)
    user = unquote(parsed.username or "guest")  # the client's default, as for the broker
    if (tls := _cause(exc, ssl.SSLError)) is not None:
        return _tls_refusal(safe_url, tls)
    if _cause(exc, ProbableAuthenticationError) is not None:
        return BrokerRefused(
            f"the broker at {safe_url} refused the login of user {user!r}: "
            "check the user name and password in TICKQ_AMQP_URL"
        )
    if (frame := _cause(exc, InvalidFrameError)) is not None and "Connection.Close" in str(frame):
        # aiormq reports a broker that closes the connection instead of opening the virtual
        # host as an unexpected frame; the user name and password were accepted by then.
        vhost = unquote(parsed.path[1:]) or "/"
        return BrokerRefused(
            f"the broker at {safe_url} refused virtual host {vhost!r}: it does not exist, or user "
            f"{user!r} has no permissions on it"
        )
    return None


def _tls_refusal(safe_url: str, failure: ssl.SSLError) -> BrokerRefused:
    if isinstance(failure, ssl.SSLCertVerificationError):  # this client refused the broker's certificate
        why = str(failure.verify_message).rstrip(".")
        if failure.verify_code in _NAME_MISMATCHES:
            return BrokerRefused(
                f"the broker's TLS certificate at {safe_url} does not name that host ({why}); "
                "connect by a name the certificate holds"
            )
        return BrokerRefused(
            f"the broker at {safe_url} presented a TLS certificate this machine does not trust ({why}); "
            "point SSL_CERT_FILE at the CA certificate that signed it, or name it with cafile= in TICKQ_AMQP_URL"
        )
    if any(alert in str(failure.reason) for alert in _CLIENT_CERTIFICATE_REFUSALS):  # the broker refused ours
        return BrokerRefused(
            f"the broker at {safe_url} wants a client certificate it trusts ({failure.reason}): name yours "
            "with certfile= and keyfile= in TICKQ_AMQP_URL"
        )
    return BrokerRefused(
        f"TLS with the broker at {safe_url} failed ({failure.reason or failure}); check that the port "
        "takes TLS (amqps:// is usually port 5671, amqp:// 5672)"
    )


def _tls_alert(url: str, context: ssl.SSLContext) -> ssl.SSLError | None:
    """The TLS error the broker at `url` answers a client that completes the handshake and
    then sends nothing, or None when it answers none within `_TLS_ALERT_WAIT_S`.

    Under TLS 1.3 a broker refuses the client's certificate after the client's side of the
    handshake is done, and the client has often sent its first AMQP bytes by then. The broker
    closes with those bytes unread, so its kernel resets the connection, and the reset can
    overtake the alert that said why. A client that sends nothing leaves nothing unread.
    """
    parsed = urlparse(url)
    host, port = parsed.hostname or "localhost", parsed.port or 5671
    try:
        with socket.create_connection((host, port), timeout=_TLS_ALERT_WAIT_S) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            tls.recv(1)  # a broker that took the certificate waits for the AMQP header: a timeout
    except (ssl.SSLZeroReturnError, ssl.SSLEOFError):  # closed without saying why
        return None
    except ssl.SSLError as alert:
        return alert
    except OSError:
        return None
    return None


def connection_parameters(amqp_url: str, name: str) -> pika.URLParameters:
    """pika parameters for a tickq broker URL (for amqps, TLS as every component sets it up:
    `tls_context`)."""
    params = pika.URLParameters(without_tls_files(amqp_url))
    context = tls_context(amqp_url)
    if context is not None:
        params.ssl_options = pika.SSLOptions(context, urlparse(amqp_url).hostname)
    params.client_properties = {"connection_name": name}
    given = parse_qs(urlparse(amqp_url).query)
    if "heartbeat" not in given:  # the URL's own, as for aio-pika's connections (`connect`)
        params.heartbeat = HEARTBEAT_S
    if "blocked_connection_timeout" not in given:
        params.blocked_connection_timeout = 60
    return params


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
    answers, and `BrokerRefused` saying why when one answers but refuses the connection (TLS,
    the login, the virtual host). TLS is set up by `tls_context`.
    """
    url = _url_with_options(settings.amqp_url, name)
    context = tls_context(settings.amqp_url)
    factory = aio_pika.connect_robust if robust else aio_pika.connect
    try:
        return await asyncio.wait_for(factory(url, timeout=timeout, ssl_context=context), timeout=timeout + 5)
    except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as exc:
        if refused := _refusal(exc, settings.amqp_url):
            raise refused from None
        if context is not None and _cause(exc, ConnectionResetError) is not None:
            # The reset may have cost us the broker's TLS alert: ask for it again.
            alert = await asyncio.to_thread(_tls_alert, settings.amqp_url, context)
            if alert is not None:
                raise _tls_refusal(settings.safe_amqp_url, alert) from None
        raise BrokerUnavailable(
            f"no RabbitMQ broker answers at {settings.safe_amqp_url} "
            f"({type(exc).__name__}); start one or point TICKQ_AMQP_URL at yours"
        ) from None
