"""Why a Kafka client cannot connect, in one line that names the setting to fix.

aiokafka reports every failed bootstrap as `KafkaConnectionError: Unable to bootstrap from
[...]` and only logs the cause (a refused connection, an untrusted certificate, a rejected
password). `connection_problem` opens one connection to each bootstrap server with the same
settings, TLS and SASL handshakes included, and turns the first failure into a reason:

    reason = await connection_problem(KafkaSettings.from_env())
    # 'SASL authentication as "alice" (SCRAM-SHA-512) failed at 10.0.0.5:9094: check
    #  EMBER_KAFKA_SASL_USERNAME and EMBER_KAFKA_SASL_PASSWORD ...'
"""

from __future__ import annotations

import asyncio
import ssl

from aiokafka.conn import AIOKafkaConnection, create_conn
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.protocol.metadata import MetadataRequest

from infra.settings import KafkaSettings


def _servers(settings: KafkaSettings) -> list[tuple[str, int]]:
    servers = []
    for entry in settings.bootstrap_servers.split(","):
        host, _, port = entry.strip().rpartition(":")
        if host and port.isdigit():
            servers.append((host.strip("[]"), int(port)))
    return servers


def explain(settings: KafkaSettings, server: str, exc: BaseException) -> str:
    """One line for a failed connection to `server`: what failed, then what to change."""
    protocol = settings.security_protocol
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or str(exc)
        if "hostname" in detail.lower() or "ip address mismatch" in detail.lower():
            return (
                f"TLS: the certificate of {server} does not name that host ({detail}): connect "
                "by a name or address the certificate lists (EMBER_BOOTSTRAP_SERVERS)"
            )
        return (
            f"TLS: the certificate of {server} is not trusted ({detail}): set "
            "EMBER_KAFKA_SSL_CAFILE to the CA bundle that signed the brokers' certificates"
        )
    reset = isinstance(exc, ConnectionError) and not isinstance(exc, ConnectionRefusedError)
    if isinstance(exc, ssl.SSLError) or (reset and settings.uses_tls):
        # A plaintext listener answers a TLS ClientHello by closing: a reset, no SSL error.
        detail = exc.reason if isinstance(exc, ssl.SSLError) else "connection closed"
        return (
            f"TLS handshake with {server} failed ({detail or exc}): is it a TLS listener? "
            f"Check EMBER_BOOTSTRAP_SERVERS and EMBER_KAFKA_SECURITY_PROTOCOL={protocol}"
        )
    if isinstance(exc, SaslAuthenticationFailed):
        return (
            f'SASL authentication as "{settings.sasl_username}" ({settings.sasl_mechanism}) '
            f"failed at {server}: check EMBER_KAFKA_SASL_USERNAME and EMBER_KAFKA_SASL_PASSWORD "
            f"(and that the user has {settings.sasl_mechanism} credentials on the cluster)"
        )
    if isinstance(exc, UnsupportedSaslMechanismError):
        return (
            f"{server} does not enable SASL mechanism {settings.sasl_mechanism}: set "
            "EMBER_KAFKA_SASL_MECHANISM to one its listener enables"
        )
    if isinstance(exc, KafkaConnectionError) or reset:
        return (
            f"{server} closed the connection during the {protocol} handshake ({exc}): the "
            "listener may expect another protocol; check EMBER_BOOTSTRAP_SERVERS and "
            "EMBER_KAFKA_SECURITY_PROTOCOL"
        )
    if isinstance(exc, asyncio.TimeoutError):
        return (
            f"{server} did not complete a {protocol} handshake in time: check "
            "EMBER_BOOTSTRAP_SERVERS and EMBER_KAFKA_SECURITY_PROTOCOL"
        )
    if isinstance(exc, OSError):
        return (
            f"cannot reach Kafka at {server} ({exc.strerror or exc}): start the local broker "
            "with `ember broker start` or set EMBER_BOOTSTRAP_SERVERS"
        )
    return f"cannot reach Kafka at {server}: {type(exc).__name__}: {exc}"


async def connection_problem(settings: KafkaSettings, timeout_s: float = 10.0) -> str | None:
    """Why a client with `settings` cannot connect (the first bootstrap server's failure that
    `explain` describes), or None when every server completes its handshakes."""
    kwargs = settings.aiokafka_kwargs()
    servers = _servers(settings)
    if not servers:
        return (
            f"EMBER_BOOTSTRAP_SERVERS={settings.bootstrap_servers!r}: expected host:port[,...]"
        )
    for host, port in servers:
        server = f"{host}:{port}"
        conn: AIOKafkaConnection | None = None
        try:
            conn = await asyncio.wait_for(
                create_conn(
                    host,
                    port,
                    client_id="ember-handshake",
                    request_timeout_ms=int(timeout_s * 1000),
                    ssl_context=kwargs.get("ssl_context"),
                    security_protocol=settings.security_protocol,
                    sasl_mechanism=settings.sasl_mechanism or "PLAIN",
                    sasl_plain_username=settings.sasl_username,
                    sasl_plain_password=settings.sasl_password,
                ),
                timeout_s,
            )
            # The first request after the handshakes, as a bootstrap sends it: a listener of
            # another protocol may accept ApiVersions and close on this one.
            await asyncio.wait_for(conn.send(MetadataRequest([])), timeout_s)
        except (OSError, KafkaError, asyncio.TimeoutError) as exc:
            return explain(settings, server, exc)
        finally:
            if conn is not None:
                conn.close()
    return None
