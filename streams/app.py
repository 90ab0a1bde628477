"""The Faust app of Ember's control plane: settings, the app, and the topics it reads and writes.

    ember streams                      # runs this app (streams/commands.py)
    EMBER_MODELS=tiny ember streams --web-port 6066

Settings come from the environment once, when this module is imported (Faust declares topics
and tables at module level, so the app must be configured by then); `ember streams` turns its
options into these variables before importing it.

| variable                      | default          | meaning                                      |
|-------------------------------|------------------|----------------------------------------------|
| EMBER_MODELS                  | (none)           | served models, `NAME` or `NAME=DIR`, by comma |
| EMBER_STREAMS_CONFIG          | (none)           | JSON file of per-model limits (below)        |
| EMBER_STREAMS_GROUP           | ember-streams    | Faust app id: group id, changelog prefix     |
| EMBER_STREAMS_STORE           | memory://        | table store; rocksdb:// needs `rocksdict`     |
| EMBER_STREAMS_WEB_HOST        | 127.0.0.1        | address the web server binds                 |
| EMBER_STREAMS_WEB_PORT        | 6066             | its port; 0 turns it off                     |
| EMBER_STREAMS_OFFSET_RESET    | latest           | where a new group starts (latest: no replay) |
| EMBER_STREAMS_TICK_S          | 1.0              | placement / autoscaler timer interval        |
| EMBER_STREAMS_REPLICATION     | 1                | replicas of the topics Faust creates         |
| EMBER_STREAMS_LINGER_MS       | 0                | producer linger: batching vs. hop latency   |
| EMBER_STREAMS_FETCH_MAX_WAIT_MS | 100            | longest fetch long poll (streams.faust_app)  |
| EMBER_STREAMS_SESSION_TIMEOUT_S | 10             | a dead process's partitions move after it    |
| EMBER_STREAMS_LOOP            | auto             | uvloop, asyncio; auto: uvloop if installed   |
| EMBER_AUTOSCALER_POLICY       | ember_predictive | or fully_cold, always_on, knative_reactive   |
| EMBER_AUTOSCALER_HOLD_EVERY_S | 30               | how often a repeated `hold` is published     |

plus the Kafka connection (`infra.settings.KafkaSettings`: bootstrap servers, TLS, SASL) and
EMBER_HOME (a durable store keeps its files under `$EMBER_HOME/streams`).

The JSON file (EMBER_STREAMS_CONFIG) names models and overrides the policies' dataclass
fields; `slots` sets the batch slots everywhere at once. Unknown fields are errors.

    {"models": {"tiny": {"slots": 8,
                         "admission": {"context_tokens": 2048},
                         "placement": {"dead_after_s": 5},
                         "scaling": {"floor": 0, "ceiling": 4, "keep_alive_s": 300}}},
     "admission": {"defer_s": 5, "default_tenant_limit": {"rate_per_s": 50, "burst": 100}},
     "autoscaler": {"policy": "always_on", "workers": 2}}

Topics. Ours are declared by `ember topics apply` (the command applies them before starting)
and marked `internal=False` so Faust never tries to create them. Faust creates its own: the
tables' changelogs and the deferred-request topic `<group>-deferred`, with
CONTROL_PARTITIONS partitions like the topics they are joined with (the broker's automatic
topic creation is off; Faust uses CreateTopics through its admin request).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import faust
from aiokafka.partitioner import murmur2

from infra.settings import KafkaSettings, Paths, SettingsError
from schemas.topics import (
    ADMITTED,
    CONTROL_PARTITIONS,
    DEADLETTERS,
    DECISIONS,
    LIFECYCLE,
    REQUESTS,
)
from streams.codec import MESSAGE_CODEC, RawSchema, register_codecs
from streams.faust_app import DEFAULT_FETCH_MAX_WAIT_MS, EmberApp
from streams.policy import (
    POLICIES,
    AdmissionSpec,
    ModelAdmission,
    PlacementSpec,
    Policy,
    ScalingSpec,
    TenantLimit,
)

OFFSET_RESETS = ("latest", "earliest")
MIN_SESSION_TIMEOUT_S = 6.0


@dataclass(frozen=True)
class ModelSpecs:
    """Everything the control plane is told about one served model."""

    admission: ModelAdmission
    placement: PlacementSpec
    scaling: ScalingSpec


@dataclass(frozen=True)
class StreamsSettings:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    group_id: str = "ember-streams"
    store: str = "memory://"
    data_dir: Path = Path("~/.ember/streams").expanduser()
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    offset_reset: str = "latest"
    tick_s: float = 1.0
    replication_factor: int = 1
    policy_name: str = "ember_predictive"
    hold_every_s: float = 30.0
    linger_ms: float = 0.0
    fetch_max_wait_ms: int = DEFAULT_FETCH_MAX_WAIT_MS
    session_timeout_s: float = 10.0
    models: tuple[str, ...] = ()
    config: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.offset_reset not in OFFSET_RESETS:
            raise SettingsError(
                f"EMBER_STREAMS_OFFSET_RESET={self.offset_reset!r}: expected latest or earliest"
            )
        if self.tick_s <= 0:
            raise SettingsError(f"EMBER_STREAMS_TICK_S={self.tick_s}: must be > 0")
        if not 0 <= self.web_port <= 65535:
            raise SettingsError(f"EMBER_STREAMS_WEB_PORT={self.web_port}: not a port")
        if self.fetch_max_wait_ms < 0:
            raise SettingsError(
                f"EMBER_STREAMS_FETCH_MAX_WAIT_MS={self.fetch_max_wait_ms}: must be >= 0"
            )
        if self.session_timeout_s < MIN_SESSION_TIMEOUT_S:
            raise SettingsError(
                f"EMBER_STREAMS_SESSION_TIMEOUT_S={self.session_timeout_s:g}: must be >= "
                f"{MIN_SESSION_TIMEOUT_S:g} (the broker's default group.min.session.timeout.ms)"
            )
        if self.policy_name not in POLICIES:
            raise SettingsError(
                f"EMBER_AUTOSCALER_POLICY={self.policy_name!r}: expected one of "
                f"{', '.join(sorted(POLICIES))}"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StreamsSettings:
        env = os.environ if env is None else env
        config: dict[str, Any] = {}
        config_path = env.get("EMBER_STREAMS_CONFIG")
        if config_path:
            config = _read_config(Path(config_path).expanduser())
        autoscaler = config.get("autoscaler", {})
        models = [e.split("=", 1)[0].strip() for e in env.get("EMBER_MODELS", "").split(",")]
        models += list(config.get("models", {}))
        try:
            return cls(
                kafka=KafkaSettings.from_env(env),
                group_id=env.get("EMBER_STREAMS_GROUP", cls.group_id),
                store=env.get("EMBER_STREAMS_STORE", cls.store),
                data_dir=Paths.from_env(env).home / "streams",
                web_host=env.get("EMBER_STREAMS_WEB_HOST", cls.web_host),
                web_port=int(env.get("EMBER_STREAMS_WEB_PORT", cls.web_port)),
                offset_reset=env.get("EMBER_STREAMS_OFFSET_RESET", cls.offset_reset),
                tick_s=float(env.get("EMBER_STREAMS_TICK_S", cls.tick_s)),
                replication_factor=int(env.get("EMBER_STREAMS_REPLICATION", 1)),
                policy_name=env.get(
                    "EMBER_AUTOSCALER_POLICY", autoscaler.get("policy", cls.policy_name)
                ),
                hold_every_s=float(env.get("EMBER_AUTOSCALER_HOLD_EVERY_S", cls.hold_every_s)),
                linger_ms=float(env.get("EMBER_STREAMS_LINGER_MS", cls.linger_ms)),
                fetch_max_wait_ms=int(
                    env.get("EMBER_STREAMS_FETCH_MAX_WAIT_MS", cls.fetch_max_wait_ms)
                ),
                session_timeout_s=float(
                    env.get("EMBER_STREAMS_SESSION_TIMEOUT_S", cls.session_timeout_s)
                ),
                models=tuple(dict.fromkeys(m for m in models if m)),
                config=config,
            )
        except ValueError as exc:
            if isinstance(exc, SettingsError):
                raise
            raise SettingsError(f"streams settings: {exc}") from None

    # -- what the policies get ------------------------------------------------------------

    def model_specs(self) -> dict[str, ModelSpecs]:
        """Per-model specs: the policies' defaults, `slots`, then the JSON overrides."""
        specs = {}
        for model in self.models:
            entry = dict(self.config.get("models", {}).get(model) or {})
            slots = entry.pop("slots", None)
            where = f"models.{model}"
            sections = {k: entry.pop(k, {}) for k in ("admission", "placement", "scaling")}
            if entry:
                raise SettingsError(f"EMBER_STREAMS_CONFIG {where}: unknown keys {sorted(entry)}")
            base: dict[str, dict[str, Any]] = {"admission": {}, "placement": {}, "scaling": {}}
            if slots is not None:
                base["admission"]["slots_per_worker"] = slots
                base["placement"]["default_slots"] = slots
                base["scaling"]["slots_per_worker"] = slots
            specs[model] = ModelSpecs(
                admission=_build(
                    ModelAdmission, base["admission"], sections["admission"], where
                ),
                placement=_build(
                    PlacementSpec, {"model": model, **base["placement"]}, sections["placement"],
                    where,
                ),
                scaling=_build(
                    ScalingSpec, {"model": model, **base["scaling"]}, sections["scaling"], where
                ),
            )
        return specs

    def admission_spec(self) -> AdmissionSpec:
        section = dict(self.config.get("admission") or {})
        limits = {
            tenant: _build(TenantLimit, {}, limit, f"admission.tenant_limits.{tenant}")
            for tenant, limit in (section.pop("tenant_limits", None) or {}).items()
        }
        default = section.pop("default_tenant_limit", None)
        if "deferrable" in section:
            section["deferrable"] = frozenset(section["deferrable"])
        models = {m: s.admission for m, s in self.model_specs().items()}
        return _build(
            AdmissionSpec,
            {
                "models": models,
                "tenant_limits": limits,
                "default_tenant_limit": None
                if default is None
                else _build(TenantLimit, {}, default, "admission.default_tenant_limit"),
            },
            section,
            "admission",
        )

    def scaling_policy(self) -> Policy[Any]:
        options = {
            k: v for k, v in (self.config.get("autoscaler") or {}).items() if k != "policy"
        }
        policy: Policy[Any] = _build(POLICIES[self.policy_name], {}, options, "autoscaler")
        return policy

    # -- what Faust gets -----------------------------------------------------------------

    def broker_urls(self) -> list[str]:
        return [f"kafka://{s.strip()}" for s in self.kafka.bootstrap_servers.split(",") if s]

    def broker_credentials(self) -> faust.types.auth.CredentialsT | None:
        kafka = self.kafka
        context = kafka.ssl_context()
        if kafka.security_protocol.startswith("SASL"):
            return faust.SASLCredentials(
                username=kafka.sasl_username,
                password=kafka.sasl_password,
                ssl_context=context,
                mechanism=kafka.sasl_mechanism,
            )
        if context is not None:
            return faust.SSLCredentials(context)
        return None


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SettingsError(f"EMBER_STREAMS_CONFIG={path}: {exc}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"EMBER_STREAMS_CONFIG={path}: expected a JSON object")
    return data


def _build(cls: type, base: Mapping[str, Any], overrides: Mapping[str, Any], where: str) -> Any:
    """`cls(**base, **overrides)`, refusing fields `cls` does not have, with `where` named."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise SettingsError(
            f"EMBER_STREAMS_CONFIG {where}: unknown field(s) {unknown} for {cls.__name__}; "
            f"known: {sorted(names)}"
        )
    try:
        return cls(**{**base, **overrides})
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"EMBER_STREAMS_CONFIG {where}: {exc}") from None


@functools.lru_cache(maxsize=4096)
def model_partition(model: str, partitions: int = CONTROL_PARTITIONS) -> int:
    """The partition of `ember.admitted` / `ember.lifecycle` that carries `model`'s records:
    Kafka's default partitioner (murmur2 of the UTF-8 key, as the Java client and aiokafka
    compute it). The placement state of a model lives in this partition of every table."""
    return (murmur2(model.encode("utf-8")) & 0x7FFFFFFF) % partitions


# --- the app --------------------------------------------------------------------------------

register_codecs()
SETTINGS = StreamsSettings.from_env()

app = EmberApp(
    SETTINGS.group_id,
    broker=SETTINGS.broker_urls(),
    broker_credentials=SETTINGS.broker_credentials(),
    store=SETTINGS.store,
    datadir=str(SETTINGS.data_dir),
    autodiscover=False,
    topic_partitions=CONTROL_PARTITIONS,
    topic_replication_factor=SETTINGS.replication_factor,
    topic_allow_declare=True,
    topic_disable_leader=True,
    consumer_auto_offset_reset=SETTINGS.offset_reset,
    key_serializer="raw",
    value_serializer=MESSAGE_CODEC,
    producer_acks=-1,
    # aiokafka keeps one produce request in flight per broker and makes a send wait while its
    # partition's batch is full: 16 KiB batches (the default) cap a busy partition at a few
    # dozen records per round trip. Placement packs a model's requests onto few partitions.
    producer_max_batch_size=512 * 1024,
    producer_linger=SETTINGS.linger_ms / 1000,
    fetch_max_wait_ms=SETTINGS.fetch_max_wait_ms,
    # A process that dies without leaving the group (SIGKILL, a lost machine) keeps its
    # partitions, and their requests wait, until its session times out: Faust's default is
    # 60 s. Heartbeats come from the consumer's own thread, a third of the session apart.
    broker_session_timeout=SETTINGS.session_timeout_s,
    broker_heartbeat_interval=SETTINGS.session_timeout_s / 3,
    web_enabled=SETTINGS.web_port > 0,
    web_bind=SETTINGS.web_host,
    web_host=SETTINGS.web_host,
    web_port=SETTINGS.web_port or 6066,
    web_in_thread=False,
)


def _ours(*names: str) -> faust.TopicT:
    """A topic declared in schemas.topics: raw bytes in, never created by Faust."""
    return app.topic(
        *names,
        schema=RawSchema(),
        partitions=CONTROL_PARTITIONS,
        internal=False,
    )


requests_topic = _ours(REQUESTS)
admitted_topic = _ours(ADMITTED)
# One channel for both: placement reads a model's requests and worker events in order, in one
# task that owns the model's state (both topics keyed by model, co-partitioned).
placement_topic = _ours(ADMITTED, LIFECYCLE)
decisions_topic = _ours(DECISIONS)
deadletters_topic = app.topic(
    DEADLETTERS,
    schema=RawSchema(),
    internal=False,
)
# Requests admission deferred: the request's own bytes, keyed by request id, with the time to
# retry in the `ember-retry-at` header. Faust creates it (it is this app's, not the protocol's).
deferred_topic = app.topic(
    f"{SETTINGS.group_id}-deferred",
    schema=RawSchema(),
    partitions=CONTROL_PARTITIONS,
    replicas=SETTINGS.replication_factor,
    retention=timedelta(days=1),
    internal=True,
)
RETRY_AT_HEADER = "ember-retry-at"


def ember_topics() -> list[str]:
    """Topics `ember streams` applies before starting: sends to them never wait."""
    from schemas.topics import all_topics

    return [spec.name for spec in all_topics(SETTINGS.models)] + [deferred_topic.get_topic_name()]
