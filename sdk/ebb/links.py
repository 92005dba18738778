"""How Ebb reaches its servers: TLS options, URLs without secrets, and what a failed connect means.

Every process of Ebb (both clients, workers, beat, the audit, the ``ebb`` command) opens its
links to RabbitMQ, its management API and Redis through here, so TLS is configured once
(``amqps://``, ``https://``, ``rediss://``; trust and client certificates from ``EBB_TLS_*``),
hostname verification is always on, and no URL reaches an error or a log with its password.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import redis
from kombu.connection import Connection

from ebb.config import Settings
from ebb.errors import (
    BrokerCredentialsRefusedError,
    BrokerUnavailableError,
    RegistryCredentialsRefusedError,
    RegistryUnavailableError,
)
from ebb.redact import redact

TLS_BROKER_SCHEMES = frozenset({"amqps"})
#: What OpenSSL says when the other end speaks no TLS (a plain listener answers AMQP's header,
#: or, like Redis, waits for a command until the handshake times out).
PLAIN_LISTENER_SIGNS = (
    "wrong_version_number",
    "record layer failure",
    "packet length",
    "handshake operation timed out",
)
TLS_REDIS_SCHEMES = frozenset({"rediss"})


def broker_urls(settings: Settings) -> list[str]:
    """EBB_BROKER_URL's brokers, in order (``;`` separates a failover list, as in kombu)."""
    return [url.strip() for url in settings.broker_url.split(";") if url.strip()]


def uses_tls(url: str) -> bool:
    return urlsplit(url).scheme.lower() in TLS_BROKER_SCHEMES | TLS_REDIS_SCHEMES | {"https"}


def tls_context(settings: Settings) -> ssl.SSLContext:
    """A client context: the system's trust store, or EBB_TLS_CA_FILE; the client certificate
    when EBB_TLS_CERT_FILE is set; certificates and host names always verified."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.tls_ca_file)
    if settings.tls_cert_file:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def amqp_ssl_options(settings: Settings) -> dict[str, Any]:
    """py-amqp's ``ssl`` options (Celery's ``broker_use_ssl``): verified, hostname checked.

    ``server_hostname`` is filled in per broker by :class:`BrokerConnection`, so each node of a
    failover list is checked against its own name.
    """
    return {
        "ca_certs": settings.tls_ca_file,
        "certfile": settings.tls_cert_file,
        "keyfile": settings.tls_key_file,
        "cert_reqs": ssl.CERT_REQUIRED,
        "server_hostname": None,
    }


class BrokerConnection(Connection):
    """kombu's connection, checking each broker's certificate against that broker's own name.

    kombu fills a missing ``server_hostname`` in the shared ``ssl`` options once, with the first
    broker it reaches, and keeps it for every later broker of a failover list; here every broker
    (and every switch to the next one) gets a copy naming the host as written in its URL.
    """

    def __init__(self, hostname: str, *args: Any, **kwargs: Any) -> None:
        #: The URL of the broker tried last (kombu rewrites ``localhost``; this keeps it as written).
        self.current_url = hostname.split(";")[0].strip()
        super().__init__(hostname, *args, **kwargs)  # type: ignore[no-untyped-call]

    def switch(self, conn_str: str) -> None:
        self.current_url = conn_str
        super().switch(conn_str)  # type: ignore[no-untyped-call]

    def _init_params(self, **params: Any) -> None:  # type: ignore[override]
        super()._init_params(**params)  # type: ignore[no-untyped-call]
        if isinstance(self.ssl, dict) and self.hostname:
            self.ssl = {**self.ssl, "server_hostname": self.hostname}


def broker_connection(settings: Settings, url: str | None = None, **options: Any) -> Connection:
    """A kombu connection to EBB_BROKER_URL (or ``url``), over TLS when its scheme is ``amqps``."""
    target = url or settings.broker_url
    if any(urlsplit(u.strip()).scheme.lower() in TLS_BROKER_SCHEMES for u in target.split(";") if u.strip()):
        options.setdefault("ssl", amqp_ssl_options(settings))
    connection: Connection = BrokerConnection(target, **options)
    return connection


def aiormq_url(url: str, heartbeat: float) -> str:
    """A broker URL as aiormq takes it: kombu's ``amqps``/``amqp`` kept, the heartbeat set."""
    parts = urlsplit(url.strip())
    scheme = "amqps" if parts.scheme.lower() in TLS_BROKER_SCHEMES else "amqp"
    return urlunsplit(parts._replace(scheme=scheme, query=f"heartbeat={max(1, round(heartbeat))}"))


def redis_client(settings: Settings, *, timeout: float, decode_responses: bool = False) -> redis.Redis:
    """A Redis client for EBB_REDIS_URL, verified TLS for ``rediss://``."""
    options: dict[str, Any] = {}
    if urlsplit(settings.redis_url).scheme.lower() in TLS_REDIS_SCHEMES:
        options = {
            "ssl_ca_certs": settings.tls_ca_file,
            "ssl_certfile": settings.tls_cert_file,
            "ssl_keyfile": settings.tls_key_file,
            "ssl_cert_reqs": "required",
            "ssl_check_hostname": True,
        }
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        decode_responses=decode_responses,
        **options,
    )


def http_tls(settings: Settings) -> dict[str, Any]:
    """``requests`` options for the management API and Prometheus: ``verify`` and ``cert``."""
    options: dict[str, Any] = {"verify": settings.tls_ca_file or True}
    if settings.tls_cert_file:
        options["cert"] = (settings.tls_cert_file, settings.tls_key_file)
    return options


# --- what a failed connection means ------------------------------------------------------------


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _host_of(url: str) -> str:
    parts = urlsplit(url.strip())
    host = parts.hostname or "?"
    return f"{host}:{parts.port}" if parts.port else host


def tls_problem(exc: BaseException, url: str, *, what: str) -> str | None:
    """Why a TLS connection to ``url`` failed, in words with the fix; ``None`` if it was not TLS.

    ``what`` names the link (``RabbitMQ``, ``Redis``) and the variable that holds its URL.
    """
    if not uses_tls(url):
        return None
    where = _host_of(url)
    for cause in _chain(exc):
        text = f"{type(cause).__name__}: {cause}"
        if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
            if "mismatch" in text.lower():
                return (
                    f"TLS to {what} at {where} failed: the server's certificate does not match the host "
                    f"name {urlsplit(url.strip()).hostname!r} ({_reason(cause)}). Use the host name the "
                    "certificate names in the URL, or have the certificate issued for this name."
                )
            return (
                f"TLS to {what} at {where} failed: the server's certificate is not trusted "
                f"({_reason(cause)}). Set EBB_TLS_CA_FILE to the PEM bundle of the CA that signed it "
                "(the system's trust store is used otherwise)."
            )
        lowered = text.lower()
        if any(sign in lowered for sign in PLAIN_LISTENER_SIGNS):
            return _plain_listener(what, where)
        if "certificate required" in lowered or "alert bad certificate" in lowered or "unknown ca" in lowered:
            return (
                f"TLS to {what} at {where} failed: the server refused this client's certificate "
                f"({_reason(cause)}). It wants mutual TLS: set EBB_TLS_CERT_FILE and EBB_TLS_KEY_FILE "
                "to a certificate it trusts."
            )
        if isinstance(cause, ConnectionResetError) or "connection reset" in lowered:
            return (
                f"TLS to {what} at {where} failed: the server reset the connection before answering "
                "(most often it wants mutual TLS and refused this client, which sent no certificate "
                "or one it does not trust): set EBB_TLS_CERT_FILE and EBB_TLS_KEY_FILE."
            )
        if isinstance(cause, ssl.SSLError) or "EOF occurred in violation of protocol" in text:
            return (
                f"TLS to {what} at {where} failed during the handshake ({_reason(cause)}): is it a TLS "
                "listener, and does it take this client's certificate (EBB_TLS_CERT_FILE)?"
            )
    return None


def _plain_listener(what: str, where: str) -> str:
    return (
        f"TLS to {what} at {where} failed: the server did not answer TLS (a plain-text listener?). "
        "Point the URL at the server's TLS port (RabbitMQ's amqps listener is 5671 by default), or "
        "use a plain URL if this link really is meant to be unencrypted."
    )


def _reason(cause: BaseException) -> str:
    if isinstance(cause, ssl.SSLCertVerificationError) and cause.verify_message:
        return str(cause.verify_message)
    if isinstance(cause, ssl.SSLError) and cause.reason:
        return str(cause.reason)
    return redact(str(cause)) or type(cause).__name__


def refused_login(exc: BaseException) -> str | None:
    """RabbitMQ's ACCESS_REFUSED (or NOT_ALLOWED for a vhost) text, if that is why it failed."""
    for cause in _chain(exc):
        text = str(cause)
        if "ACCESS_REFUSED" in text or "ProbableAuthenticationError" in type(cause).__name__:
            return "ACCESS_REFUSED"
        if "AccessRefused" in type(cause).__name__ or "AuthenticationError" in type(cause).__name__:
            return "ACCESS_REFUSED"
        if "NOT_ALLOWED" in text or "NotAllowed" in type(cause).__name__:
            return "NOT_ALLOWED"
        if "Connection.OpenOk" in text and "Connection.Close" in text:
            return "NOT_ALLOWED"  # aiormq's words for the broker closing at connection.open
    return None


def broker_user_and_vhost(url: str) -> tuple[str, str]:
    parts = urlsplit(url.strip())
    path = parts.path
    vhost = "/" if path in ("", "/") else unquote(path[1:])
    return unquote(parts.username or "guest"), vhost


def broker_connect_error(
    exc: BaseException, settings: Settings, url: str | None = None
) -> BrokerUnavailableError:
    """The error a caller sees when no broker of EBB_BROKER_URL took the connection.

    TLS failures say TLS and why; a refused login says the credentials were refused and what
    to check; anything else that the broker could not be reached. No password in any of them.
    """
    if isinstance(exc, BrokerUnavailableError):
        return exc
    target = url or broker_urls(settings)[0]
    tls = tls_problem(exc, target, what="RabbitMQ")
    if tls is not None:
        return BrokerUnavailableError(tls)
    user, vhost = broker_user_and_vhost(target)
    refusal = refused_login(exc)
    if refusal == "NOT_ALLOWED":
        return BrokerCredentialsRefusedError(
            f"RabbitMQ at {_host_of(target)} accepted user {user!r} but refused it vhost {vhost!r} "
            "(NOT_ALLOWED: the vhost does not exist, or the user has no permissions there): create "
            f"it or grant them (rabbitmqctl set_permissions -p '{vhost}' {user} ...), or fix the "
            "vhost, the path of EBB_BROKER_URL."
        )
    if refusal is not None:
        return BrokerCredentialsRefusedError(
            f"RabbitMQ at {_host_of(target)} refused the credentials of user {user!r} (ACCESS_REFUSED): "
            "check the user name and password in EBB_BROKER_URL (percent-encode special characters), "
            f"that the user exists on this broker, and that it may use vhost {vhost!r}."
        )
    return BrokerUnavailableError(
        f"cannot reach RabbitMQ at {redact(settings.broker_url)}: {redact(str(exc)) or type(exc).__name__}. "
        "Start the broker or set EBB_BROKER_URL."
    )


def registry_error(exc: BaseException, settings: Settings, doing: str) -> RegistryUnavailableError:
    """The error a caller sees when Redis (the job registry) failed ``doing`` something."""
    tls = tls_problem(exc, settings.redis_url, what="Redis")
    if tls is not None:
        return RegistryUnavailableError(f"{doing}: {tls}")
    text = str(exc)
    if isinstance(exc, redis.AuthenticationError) or any(
        marker in text for marker in ("WRONGPASS", "NOAUTH", "invalid username-password", "invalid password")
    ):
        return RegistryCredentialsRefusedError(
            f"{doing}: Redis at {_host_of(settings.redis_url)} refused the credentials of EBB_REDIS_URL "
            f"({redact(text)}): check the user name and password there."
        )
    return RegistryUnavailableError(
        f"{doing}: Redis at {redact(settings.redis_url)} cannot be reached ({redact(text)}); start it or "
        "set EBB_REDIS_URL."
    )
