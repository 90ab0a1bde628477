"""One settings object, built once at the edge from the environment and passed down.

Every Ember component (streams app, workers, supervisor, CLI, tests) reaches Kafka through
`KafkaSettings`: point `EMBER_BOOTSTRAP_SERVERS` (plus the TLS/SASL variables below) at an
external cluster and nothing else changes.

| variable                         | default            | meaning                                   |
|----------------------------------|--------------------|-------------------------------------------|
| EMBER_BOOTSTRAP_SERVERS          | 127.0.0.1:9092     | comma-separated host:port list            |
| EMBER_KAFKA_SECURITY_PROTOCOL    | PLAINTEXT          | PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL  |
| EMBER_KAFKA_SASL_MECHANISM       | (none)             | PLAIN, SCRAM-SHA-256, SCRAM-SHA-512       |
| EMBER_KAFKA_SASL_USERNAME        | (none)             |                                           |
| EMBER_KAFKA_SASL_PASSWORD        | (none)             |                                           |
| EMBER_KAFKA_SSL_CAFILE           | (none)             | CA bundle that signed the brokers' certs  |
| EMBER_KAFKA_SSL_CERTFILE         | (none)             | client certificate (mutual TLS)           |
| EMBER_KAFKA_SSL_KEYFILE          | (none)             | client key (mutual TLS)                   |
| EMBER_HOME                       | ~/.ember           | broker data, logs, pid files              |
| EMBER_CACHE_DIR                  | ~/.cache/ember     | assembled Kafka jars and other downloads  |
| EMBER_BROKER_PORT                | 9092               | local broker client port (loopback)       |
| EMBER_CONTROLLER_PORT            | 9093               | local broker KRaft controller port        |
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class SettingsError(ValueError):
    """A setting is missing or inconsistent; the message names the variable to fix."""


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def __post_init__(self) -> None:
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise SettingsError(
                f"EMBER_KAFKA_SECURITY_PROTOCOL={self.security_protocol!r}: expected one of "
                f"{', '.join(SECURITY_PROTOCOLS)}"
            )
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise SettingsError(
                    f"EMBER_KAFKA_SASL_MECHANISM={self.sasl_mechanism!r}: with "
                    f"{self.security_protocol} set one of {', '.join(SASL_MECHANISMS)}"
                )
            if not self.sasl_username or self.sasl_password is None:
                raise SettingsError(
                    "EMBER_KAFKA_SASL_USERNAME and EMBER_KAFKA_SASL_PASSWORD are required with "
                    f"{self.security_protocol}"
                )
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise SettingsError(
                "EMBER_KAFKA_SSL_CERTFILE and EMBER_KAFKA_SSL_KEYFILE go together (mutual TLS)"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> KafkaSettings:
        env = os.environ if env is None else env
        return cls(
            bootstrap_servers=env.get("EMBER_BOOTSTRAP_SERVERS", cls.bootstrap_servers),
            security_protocol=env.get("EMBER_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT").upper(),
            sasl_mechanism=env.get("EMBER_KAFKA_SASL_MECHANISM") or None,
            sasl_username=env.get("EMBER_KAFKA_SASL_USERNAME") or None,
            sasl_password=env.get("EMBER_KAFKA_SASL_PASSWORD"),
            ssl_cafile=env.get("EMBER_KAFKA_SSL_CAFILE") or None,
            ssl_certfile=env.get("EMBER_KAFKA_SSL_CERTFILE") or None,
            ssl_keyfile=env.get("EMBER_KAFKA_SSL_KEYFILE") or None,
        )

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.uses_tls:
            return None
        context = ssl.create_default_context(cafile=self.ssl_cafile)
        if self.ssl_certfile and self.ssl_keyfile:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        return context

    def aiokafka_kwargs(self) -> dict[str, object]:
        """Keyword arguments shared by AIOKafkaProducer, AIOKafkaConsumer and the admin client."""
        kwargs: dict[str, object] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
        }
        if self.uses_tls:
            kwargs["ssl_context"] = self.ssl_context()
        if self.security_protocol.startswith("SASL"):
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password
        return kwargs


@dataclass(frozen=True)
class Paths:
    home: Path
    cache: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Paths:
        env = os.environ if env is None else env
        home = Path(env.get("EMBER_HOME", "~/.ember")).expanduser()
        cache = Path(env.get("EMBER_CACHE_DIR", "~/.cache/ember")).expanduser()
        return cls(home=home, cache=cache)
