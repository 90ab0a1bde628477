"""A real Apache Kafka broker on this machine: KRaft, one node, plain `java`, no Docker.

The broker is assembled once from Maven Central (infra/kafka/pom.xml, Kafka `KAFKA_VERSION`)
into the jar cache, formatted once, and then started and stopped as a detached process that
survives the command that started it. Its data survives restarts.

    LocalBroker(BrokerSettings.from_env()).start()   # idempotent; returns once it answers
    LocalBroker(settings).status()                   # BrokerStatus, never raises
    LocalBroker(settings).stop()                     # SIGTERM, wait, SIGKILL; no orphan JVM

Files (EMBER_HOME defaults to ~/.ember, EMBER_CACHE_DIR to ~/.cache/ember):

| path                                   | what                                            |
|----------------------------------------|-------------------------------------------------|
| $EMBER_CACHE_DIR/kafka-<version>/libs  | broker jars, assembled by Maven, shared         |
| $EMBER_HOME/kafka/data                 | KRaft metadata and topic data (meta.properties) |
| $EMBER_HOME/kafka/server.properties    | written at every start from BrokerSettings      |
| $EMBER_HOME/kafka/broker.log           | broker stdout+stderr (previous run: .log.1)     |
| $EMBER_HOME/kafka/broker.pid           | pid of the running JVM (its own process group)  |
| $EMBER_HOME/kafka/broker.lock          | serializes concurrent start/stop                |

Settings beyond infra/settings.py:

| variable               | default                 | meaning                                       |
|------------------------|-------------------------|-----------------------------------------------|
| EMBER_KAFKA_DATA_DIR   | $EMBER_HOME/kafka/data  | broker data directory (log.dirs)              |
| EMBER_KAFKA_CLUSTER_ID | (generated at format)   | pin the cluster id; a data dir of another     |
|                        |                         | cluster is then refused instead of used       |
| EMBER_BROKER_HEAP      | 512m                    | JVM -Xmx                                      |

Optional SASL_SSL listener (`BrokerSettings.sasl_ssl`, off by default; set in code, e.g. by
the security tests): a second client listener with TLS (a PEM key and certificate chain) and
SASL/SCRAM-SHA-512, its users stored when the data dir is formatted, and optionally ACLs
(StandardAuthorizer). The loopback PLAINTEXT listeners stay as they are, for the controller,
inter-broker traffic and the readiness probe; with ACLs their principal (User:ANONYMOUS) is a
super user, so that listener must stay private to the host, as it is here.

External clusters: when EMBER_BOOTSTRAP_SERVERS is anything but this broker's loopback
address, `ember broker start` says so and starts nothing (`targets_local_broker`); stop and
status always act on the local broker only.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import enum
import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from infra.logs import get_logger
from infra.settings import KafkaSettings, Paths, SettingsError

log = get_logger(__name__)

# Pinned here and passed to Maven as -Dkafka.version, so the POM and Python always agree.
KAFKA_VERSION = "4.1.1"
MIN_JAVA_VERSION = 17
NODE_ID = 1
HOST = "127.0.0.1"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})

KAFKA_RESOURCES = Path(__file__).parent / "kafka"
POM_FILE = KAFKA_RESOURCES / "pom.xml"
LOG4J_CONFIG = KAFKA_RESOURCES / "log4j2.yaml"
MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"

Progress = Callable[[str], None]


# -- errors --------------------------------------------------------------------------------


class BrokerError(RuntimeError):
    """The local broker could not be started or stopped. `reason` is one line a user can act
    on; `details` (may be empty) holds supporting output such as the broker log's tail."""

    def __init__(self, reason: str, details: str = "") -> None:
        super().__init__(reason if not details else f"{reason}\n{details}")
        self.reason = reason
        self.details = details


class JavaError(BrokerError):
    """java is missing or too old."""


class MavenError(BrokerError):
    """mvn is missing or could not assemble the broker jars."""


class PortInUseError(BrokerError):
    """The broker or controller port is taken by another process."""


class DataDirError(BrokerError):
    """The data directory belongs to another cluster or node, or is not a Kafka data dir."""


class BrokerStartError(BrokerError):
    """The broker process exited during start or did not answer in time."""


# -- settings ------------------------------------------------------------------------------


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected a port number") from None


SCRAM_MECHANISM = "SCRAM-SHA-512"
STANDARD_AUTHORIZER = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
_SCRAM_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SCRAM_PASSWORD = re.compile(r"[A-Za-z0-9._~+/-]{8,128}")  # nothing the --add-scram syntax parses


@dataclass(frozen=True)
class SaslSslListener:
    """A client listener with TLS and SASL/SCRAM-SHA-512 next to the PLAINTEXT one.

    `keystore` is one PEM file holding the broker's private key (PKCS#8, unencrypted) and its
    certificate chain; the certificate must name 127.0.0.1 (subjectAltName IP) for clients to
    verify it. `scram_users` (name, password) are written into the cluster metadata when the
    data dir is formatted (`kafka-storage format --add-scram`), so they apply to a fresh data
    dir only (the passwords are on the format tool's command line for those seconds: a local
    broker's concern, not a production cluster's). `acls`: deny what no ACL allows
    (StandardAuthorizer), except for the `super_users` (SCRAM user names) and the loopback
    PLAINTEXT listeners' User:ANONYMOUS."""

    port: int
    keystore: Path
    scram_users: tuple[tuple[str, str], ...] = ()
    acls: bool = False
    super_users: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise SettingsError(f"SASL_SSL listener port {self.port}: expected 1..65535")
        for name, password in self.scram_users:
            if not _SCRAM_NAME.fullmatch(name):
                raise SettingsError(f"SCRAM user name {name!r}: use [A-Za-z0-9._-], 1-64 chars")
            if not _SCRAM_PASSWORD.fullmatch(password):
                raise SettingsError(
                    f"SCRAM password of {name!r}: use 8-128 characters of [A-Za-z0-9._~+/-]"
                )

    @property
    def bootstrap_servers(self) -> str:
        return f"{HOST}:{self.port}"


@dataclass(frozen=True)
class BrokerSettings:
    home: Path
    cache: Path
    port: int = 9092
    controller_port: int = 9093
    data_dir: Path = Path()  # Path(): <home>/kafka/data
    cluster_id: str | None = None
    heap: str = "512m"
    kafka_version: str = KAFKA_VERSION
    start_timeout_s: float = 60.0
    stop_timeout_s: float = 30.0
    sasl_ssl: SaslSslListener | None = None  # None: PLAINTEXT only

    def __post_init__(self) -> None:
        for name, port in (
            ("EMBER_BROKER_PORT", self.port),
            ("EMBER_CONTROLLER_PORT", self.controller_port),
        ):
            if not 0 < port < 65536:
                raise SettingsError(f"{name}={port}: expected a port in 1..65535")
        if self.port == self.controller_port:
            raise SettingsError(
                f"EMBER_BROKER_PORT and EMBER_CONTROLLER_PORT are both {self.port}: use two ports"
            )
        if self.sasl_ssl is not None and self.sasl_ssl.port in (self.port, self.controller_port):
            raise SettingsError(
                f"the SASL_SSL listener's port {self.sasl_ssl.port} is also the broker's or the "
                "controller's: use a third port"
            )
        if not re.fullmatch(r"\d+[kKmMgG]?", self.heap):
            raise SettingsError(f"EMBER_BROKER_HEAP={self.heap!r}: expected e.g. 512m or 1g")
        if self.cluster_id is not None and not re.fullmatch(r"[A-Za-z0-9_-]{22}", self.cluster_id):
            raise SettingsError(
                f"EMBER_KAFKA_CLUSTER_ID={self.cluster_id!r}: expected a 22-character base64url "
                "Kafka cluster id (e.g. from `generate_cluster_id()`)"
            )
        if self.data_dir == Path():
            object.__setattr__(self, "data_dir", self.home / "kafka" / "data")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BrokerSettings:
        env = os.environ if env is None else env
        paths = Paths.from_env(env)
        data_dir = env.get("EMBER_KAFKA_DATA_DIR")
        return cls(
            home=paths.home,
            cache=paths.cache,
            port=_port(env, "EMBER_BROKER_PORT", cls.port),
            controller_port=_port(env, "EMBER_CONTROLLER_PORT", cls.controller_port),
            data_dir=Path(data_dir).expanduser().absolute() if data_dir else Path(),
            cluster_id=env.get("EMBER_KAFKA_CLUSTER_ID") or None,
            heap=env.get("EMBER_BROKER_HEAP", cls.heap),
        )

    @property
    def kafka_dir(self) -> Path:
        return self.home / "kafka"

    @property
    def libs_dir(self) -> Path:
        return self.cache / f"kafka-{self.kafka_version}" / "libs"

    @property
    def properties_file(self) -> Path:
        return self.kafka_dir / "server.properties"

    @property
    def log_file(self) -> Path:
        return self.kafka_dir / "broker.log"

    @property
    def pid_file(self) -> Path:
        return self.kafka_dir / "broker.pid"

    @property
    def lock_file(self) -> Path:
        return self.kafka_dir / "broker.lock"

    @property
    def bootstrap_servers(self) -> str:
        return f"{HOST}:{self.port}"

    def kafka_settings(self) -> KafkaSettings:
        """Client settings that reach this broker."""
        return KafkaSettings(bootstrap_servers=self.bootstrap_servers)


def targets_local_broker(kafka: KafkaSettings, broker: BrokerSettings) -> bool:
    """True when the client settings point at this machine's local broker (one loopback
    address on the broker port, PLAINTEXT); anything else is an external cluster."""
    servers = [s.strip() for s in kafka.bootstrap_servers.split(",") if s.strip()]
    if len(servers) != 1 or kafka.security_protocol != "PLAINTEXT":
        return False
    host, _, port = servers[0].rpartition(":")
    return host in LOOPBACK_HOSTS and port == str(broker.port)


def generate_cluster_id() -> str:
    """A Kafka cluster id: a random UUID as 22 base64url characters (as `kafka-storage
    random-uuid` prints), never starting with '-' so it is safe on a command line."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


# -- java and jars -------------------------------------------------------------------------


@dataclass(frozen=True)
class Java:
    path: str
    major: int
    build: str  # short hash of `java -version`: class-data archives are per JVM build


def find_java(env: Mapping[str, str] | None = None) -> Java:
    """The java to run the broker with: $JAVA_HOME/bin/java, else java on PATH; >= 17."""
    env = os.environ if env is None else env
    java_home = env.get("JAVA_HOME")
    candidate = Path(java_home) / "bin" / "java" if java_home else None
    path = str(candidate) if candidate and candidate.is_file() else shutil.which("java")
    if path is None:
        raise JavaError(
            f"java not found: Kafka {KAFKA_VERSION} needs Java {MIN_JAVA_VERSION}+; install a "
            "JDK (e.g. `apt-get install openjdk-17-jre-headless`) or set JAVA_HOME"
        )
    result = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=30)
    output = result.stderr + result.stdout
    match = re.search(r'version "(\d+)(?:\.(\d+))?', output)
    if result.returncode != 0 or match is None:
        raise JavaError(f"{path} -version failed: {output.strip()[:200]!r}")
    major = int(match.group(1))
    if major == 1 and match.group(2):  # "1.8.0_392" style
        major = int(match.group(2))
    if major < MIN_JAVA_VERSION:
        raise JavaError(
            f"{path} is Java {major}; Kafka {KAFKA_VERSION} needs Java {MIN_JAVA_VERSION}+: "
            "install a newer JDK and put it first on PATH or set JAVA_HOME"
        )
    build = hashlib.sha1(f"{path}\n{output}".encode()).hexdigest()[:12]
    return Java(path, major, build)


def _jars_complete(libs: Path, version: str) -> bool:
    return (libs / f"kafka_2.13-{version}.jar").is_file()


def ensure_jars(settings: BrokerSettings, progress: Progress) -> Path:
    """The directory of broker jars, assembled by Maven on first use.

    Maven copies into a private staging directory that is renamed into place only when
    complete, so a crash or a concurrent start never leaves a half-filled libs directory."""
    libs = settings.libs_dir
    if _jars_complete(libs, settings.kafka_version):
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise MavenError(
            f"mvn not found: it is needed once to assemble Kafka {settings.kafka_version} into "
            f"{libs}; install Maven (e.g. `apt-get install maven`) or copy the jars there"
        )
    libs.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(f"{libs}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    # A private copy of the POM keeps Maven's working files out of the source tree.
    shutil.copy(POM_FILE, staging / "pom.xml")
    out_dir = staging / "libs"
    command = [
        mvn,
        "-B",
        "-f",
        str(staging / "pom.xml"),
        f"-Dkafka.version={settings.kafka_version}",
        "dependency:copy-dependencies",
        f"-DoutputDirectory={out_dir}",
    ]
    progress(
        f"assembling Kafka {settings.kafka_version} from Maven Central into {libs} "
        "(first start only)"
    )
    started = time.monotonic()
    log.info("broker.jars.assemble", command=command)
    lines: list[str] = []
    try:
        with subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=staging,
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip()
                lines.append(line)
                match = re.search(
                    r"Downloaded from \S+: \S+/([^/\s]+\.jar) \(([^)]*?)(?: at|\))", line
                )
                if match:
                    progress(f"  downloaded {match.group(1)} ({match.group(2)})")
        if proc.returncode != 0 or not _jars_complete(out_dir, settings.kafka_version):
            tail = "\n".join(lines[-25:])
            raise MavenError(
                f"Maven could not assemble Kafka {settings.kafka_version} (exit "
                f"{proc.returncode}): check access to Maven Central (repo.maven.apache.org) or "
                "the proxy/mirror in ~/.m2/settings.xml",
                tail,
            )
        if libs.exists() and not _jars_complete(libs, settings.kafka_version):
            shutil.rmtree(libs)  # a broken leftover, not a concurrent winner
        try:
            out_dir.rename(libs)
        except OSError:
            if not _jars_complete(libs, settings.kafka_version):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    jars = list(libs.glob("*.jar"))
    size_mb = sum(j.stat().st_size for j in jars) / 1e6
    elapsed = time.monotonic() - started
    progress(f"assembled {len(jars)} jars ({size_mb:.0f} MB) in {elapsed:.1f} s")
    log.info("broker.jars.ready", libs=str(libs), jars=len(jars), seconds=round(elapsed, 2))
    return libs


# -- storage -------------------------------------------------------------------------------


def read_meta_properties(data_dir: Path) -> dict[str, str] | None:
    """The key=value pairs of <data_dir>/meta.properties, or None when it is not formatted."""
    path = data_dir / "meta.properties"
    if not path.is_file():
        return None
    meta: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, _, value = line.partition("=")
            meta[key.strip()] = value.strip()
    return meta


def check_data_dir(settings: BrokerSettings) -> str | None:
    """The cluster id the data dir is formatted for, None when it is empty or absent.
    Raises DataDirError when it belongs to another cluster or node or is not a Kafka dir."""
    data_dir = settings.data_dir
    meta = read_meta_properties(data_dir)
    if meta is None:
        if data_dir.is_dir() and any(data_dir.iterdir()):
            raise DataDirError(
                f"{data_dir} is not empty but has no meta.properties, so it is not a formatted "
                "Kafka data dir: empty it or set EMBER_KAFKA_DATA_DIR to another directory"
            )
        return None
    cluster_id = meta.get("cluster.id")
    if meta.get("version") != "1" or not cluster_id:
        raise DataDirError(
            f"{data_dir}/meta.properties is not a KRaft (version=1) data dir: it was written by "
            "an older Kafka or by hand; move it away or set EMBER_KAFKA_DATA_DIR"
        )
    if meta.get("node.id") != str(NODE_ID):
        raise DataDirError(
            f"{data_dir} belongs to Kafka node {meta.get('node.id')} of cluster {cluster_id}, "
            f"not to the local broker (node {NODE_ID}): set EMBER_KAFKA_DATA_DIR to another "
            "directory, or delete it to start empty"
        )
    if settings.cluster_id is not None and cluster_id != settings.cluster_id:
        raise DataDirError(
            f"{data_dir} belongs to Kafka cluster {cluster_id}, but EMBER_KAFKA_CLUSTER_ID is "
            f"{settings.cluster_id}: point EMBER_KAFKA_DATA_DIR at that cluster's data, unset "
            "EMBER_KAFKA_CLUSTER_ID to adopt this one, or delete the directory to start empty"
        )
    return cluster_id


def server_properties(settings: BrokerSettings) -> str:
    """The broker's server.properties: one combined broker+controller node on loopback."""
    props = {
        "process.roles": "broker,controller",
        "node.id": str(NODE_ID),
        "controller.quorum.voters": f"{NODE_ID}@{HOST}:{settings.controller_port}",
        "listeners": f"PLAINTEXT://{HOST}:{settings.port},CONTROLLER://{HOST}:"
        f"{settings.controller_port}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{settings.port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(settings.data_dir),
        # One node: internal topics cannot have more than one replica.
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # Consumers join at once instead of waiting 3 s for others that will not come.
        "group.initial.rebalance.delay.ms": "0",
        # Topics are declared (ember topics apply), never created by a typo.
        "auto.create.topics.enable": "false",
        "num.partitions": "1",
    }
    if settings.sasl_ssl is not None:
        props.update(_sasl_ssl_properties(settings.sasl_ssl))
        props["listeners"] += f",SASL_SSL://{HOST}:{settings.sasl_ssl.port}"
        props["advertised.listeners"] += f",SASL_SSL://{HOST}:{settings.sasl_ssl.port}"
        props["listener.security.protocol.map"] += ",SASL_SSL:SASL_SSL"
    lines = ["# Written by `ember broker start` (infra/broker.py) at every start; edits are lost."]
    lines += [f"{key}={value}" for key, value in props.items()]
    return "\n".join(lines) + "\n"


def _sasl_ssl_properties(listener: SaslSslListener) -> dict[str, str]:
    """The SASL_SSL listener's own settings (listener-prefixed, so PLAINTEXT is untouched)."""
    prefix = "listener.name.sasl_ssl."
    mechanism = SCRAM_MECHANISM.lower()
    props = {
        f"{prefix}ssl.keystore.type": "PEM",
        f"{prefix}ssl.keystore.location": str(listener.keystore),
        f"{prefix}sasl.enabled.mechanisms": SCRAM_MECHANISM,
        # Server side of SCRAM: no credentials here, they live in the cluster metadata.
        f"{prefix}{mechanism}.sasl.jaas.config": (
            "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        ),
    }
    if listener.acls:
        props["authorizer.class.name"] = STANDARD_AUTHORIZER
        props["super.users"] = ";".join(
            ["User:ANONYMOUS", *(f"User:{name}" for name in listener.super_users)]
        )
    return props


def cds_archive(settings: BrokerSettings, java: Java) -> Path:
    """Application class-data archive of the broker for this JVM build, next to the jars.

    Loading classes from it instead of ~45 jars halves the broker's start on a 2-core machine
    (measured 5.2 s -> 2.6 s median to ready). The first start dumps it at JVM exit into the
    broker dir (`cds_dump`); a clean stop moves it here. A stale or foreign archive is
    ignored by the JVM (-Xshare:auto), never fatal."""
    return settings.libs_dir.parent / "cds" / f"broker-java{java.major}-{java.build}.jsa"


def cds_dump(settings: BrokerSettings) -> Path:
    return settings.kafka_dir / "broker-cds.jsa"


def _cds_flags(settings: BrokerSettings, java: Java) -> list[str]:
    archive = cds_archive(settings, java)
    if archive.is_file():
        return [f"-XX:SharedArchiveFile={archive}"]
    return [f"-XX:ArchiveClassesAtExit={cds_dump(settings)}"]


def _adopt_cds_dump(settings: BrokerSettings) -> None:
    """Move the archive the JVM dumped at a clean exit into the shared cache, atomically."""
    dump = cds_dump(settings)
    if not dump.is_file():
        return
    try:
        archive = cds_archive(settings, find_java())
        archive.parent.mkdir(parents=True, exist_ok=True)
        staging = archive.with_name(f"{archive.name}.{os.getpid()}.tmp")
        shutil.move(dump, staging)
        staging.replace(archive)
        log.info("broker.cds.saved", archive=str(archive))
    except (OSError, BrokerError) as exc:
        log.warning("broker.cds.not_saved", error=repr(exc))
    finally:
        dump.unlink(missing_ok=True)


def _java_command(
    java: Java, settings: BrokerSettings, main_class: str, cds: list[str] | None = None
) -> list[str]:
    return [
        java.path,
        *(cds or []),
        f"-Xmx{settings.heap}",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
        "-cp",
        f"{settings.libs_dir}/*",
        main_class,
    ]


def format_storage(settings: BrokerSettings, java: Java, progress: Progress) -> str:
    """Format the KRaft data dir unless it already is; returns its cluster id."""
    existing = check_data_dir(settings)
    if existing is not None:
        return existing
    cluster_id = settings.cluster_id or generate_cluster_id()
    settings.kafka_dir.mkdir(parents=True, exist_ok=True)
    settings.properties_file.write_text(server_properties(settings))
    archive = cds_archive(settings, java)
    cds = [f"-XX:SharedArchiveFile={archive}"] if archive.is_file() else []
    tool = _java_command(java, settings, STORAGE_TOOL, cds)
    command = [*tool, "format", "-t", cluster_id, "-c", str(settings.properties_file)]
    for name, password in settings.sasl_ssl.scram_users if settings.sasl_ssl else ():
        command += ["--add-scram", f"{SCRAM_MECHANISM}=[name={name},password={password}]"]
    progress(f"formatting {settings.data_dir} for new cluster {cluster_id}")
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise DataDirError(
            f"formatting {settings.data_dir} failed (exit {result.returncode}): see the output "
            "below; fix or delete the directory and start again",
            (result.stdout + result.stderr)[-3000:],
        )
    log.info("broker.formatted", data_dir=str(settings.data_dir), cluster_id=cluster_id)
    return cluster_id


# -- processes and ports -------------------------------------------------------------------


def _proc_cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None


def _is_alive(pid: int) -> bool:
    """True while pid runs (a zombie child is reaped and counts as dead)."""
    with contextlib.suppress(ChildProcessError, OSError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not Path("/proc").is_dir()


def _is_our_broker(pid: int, settings: BrokerSettings) -> bool:
    """pid is alive and is the JVM started for this settings' server.properties (guards
    against a recycled pid)."""
    if not _is_alive(pid):
        return False
    cmdline = _proc_cmdline(pid)
    if cmdline is None:  # no /proc: trust the pid file
        return True
    return MAIN_CLASS in cmdline and str(settings.properties_file) in cmdline


def _read_pid(settings: BrokerSettings) -> int | None:
    try:
        return int(settings.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _port_owner(port: int) -> str | None:
    """Best effort 'pid N (name)' of the process listening on a TCP port (Linux /proc)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(table).read_text().splitlines()[1:]:
                cols = row.split()
                if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    return f"pid {proc.name} ({_describe_process(int(proc.name))})"
    return None


def _describe_process(pid: int) -> str:
    """'java', or for a Kafka broker 'Kafka broker with /path/server.properties'."""
    args = (_proc_cmdline(pid) or "").split()
    if MAIN_CLASS in args and args[-1].endswith(".properties"):
        return f"Kafka broker with {args[-1]}"
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "unknown"


def _check_port_free(port: int, variable: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the JVM: a port with only TIME_WAIT connections left counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            owner = _port_owner(port)
            by = f" by {owner}" if owner else " by another process"
            raise PortInUseError(
                f"port {port} on {HOST} ({variable}) is in use{by}: stop it, or set {variable} "
                "to a free port (and EMBER_BOOTSTRAP_SERVERS to match)"
            ) from None


def _wait_dead(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _is_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the broker's process group (it is its own session leader), else just pid."""
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _terminate(pid: int, timeout_s: float) -> bool:
    """SIGTERM, wait up to timeout_s, then SIGKILL. True when it exited on SIGTERM."""
    _signal_group(pid, signal.SIGTERM)
    if _wait_dead(pid, timeout_s):
        return True
    log.warning("broker.kill", pid=pid, after_s=timeout_s)
    _signal_group(pid, signal.SIGKILL)
    _wait_dead(pid, 10.0)
    return False


@contextlib.contextmanager
def _locked(settings: BrokerSettings) -> Iterator[None]:
    settings.kafka_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.lock_file, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def log_excerpt(path: Path, lines: int = 20) -> str:
    """The first ERROR lines and the last `lines` lines of a broker log, for error messages."""
    try:
        text = path.read_text(errors="replace").splitlines()[-2000:]
    except OSError:
        return f"(no log at {path})"
    errors = [line for line in text if " ERROR " in line or line.startswith("Error")][:3]
    parts = [f"--- {path} (first errors) ---", *errors] if errors else []
    parts += [f"--- {path} (last {lines} lines) ---", *text[-lines:]]
    return "\n".join(parts)


# -- readiness -----------------------------------------------------------------------------


async def _metadata(kafka: KafkaSettings, timeout_s: float) -> dict[str, object]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        **kafka.aiokafka_kwargs(),
        request_timeout_ms=int(timeout_s * 1000),
        client_id="ember-probe",
    )
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        return await asyncio.wait_for(admin.describe_cluster(), timeout_s)
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def cluster_metadata(kafka: KafkaSettings, timeout_s: float = 5.0) -> dict[str, object] | None:
    """The cluster's metadata (cluster_id, brokers, controller_id) or None when no broker at
    kafka.bootstrap_servers answers a metadata request within timeout_s. Safe to call with
    or without a running event loop (it runs its own loop in a worker thread)."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ember-probe") as pool:
        try:
            metadata = pool.submit(asyncio.run, _metadata(kafka, timeout_s)).result()
        except Exception as exc:
            log.debug("broker.probe.failed", bootstrap=kafka.bootstrap_servers, error=repr(exc))
            return None
    brokers = metadata.get("brokers")
    return metadata if isinstance(brokers, list) and brokers else None


def is_reachable(kafka: KafkaSettings, timeout_s: float = 5.0) -> bool:
    return cluster_metadata(kafka, timeout_s) is not None


def _accepts_tcp(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
        return True
    return False


# -- the broker ----------------------------------------------------------------------------


class BrokerState(enum.StrEnum):
    RUNNING = "running"  # our JVM is alive and answers metadata requests
    UNRESPONSIVE = "unresponsive"  # our JVM is alive but does not answer (starting or stuck)
    STOPPED = "stopped"  # no JVM of ours


@dataclass(frozen=True)
class BrokerStatus:
    state: BrokerState
    pid: int | None
    bootstrap_servers: str
    kafka_version: str
    cluster_id: str | None
    data_dir: Path
    log_file: Path

    @property
    def running(self) -> bool:
        return self.state is BrokerState.RUNNING

    def describe(self) -> str:
        pid = f" (pid {self.pid})" if self.pid else ""
        return "\n".join(
            [
                f"local Kafka broker: {self.state}{pid}",
                f"  bootstrap servers  {self.bootstrap_servers}",
                f"  kafka version      {self.kafka_version}",
                f"  cluster id         {self.cluster_id or '(not formatted)'}",
                f"  data dir           {self.data_dir}",
                f"  log                {self.log_file}",
            ]
        )


def _log_progress(message: str) -> None:
    log.info("broker.progress", message=message)


class LocalBroker:
    """Start, stop and inspect the local broker described by `settings`.

    Every method is safe to call in any state and from several processes at once: start of
    a running broker returns its status, stop of a stopped one returns False."""

    def __init__(self, settings: BrokerSettings, progress: Progress | None = None) -> None:
        self.settings = settings
        self.progress = progress or _log_progress

    def status(self) -> BrokerStatus:
        s = self.settings
        pid = _read_pid(s)
        if pid is not None and not _is_our_broker(pid, s):
            pid = None
        state = BrokerState.STOPPED
        if pid is not None:
            answering = _accepts_tcp(s.port) and is_reachable(s.kafka_settings(), 3.0)
            state = BrokerState.RUNNING if answering else BrokerState.UNRESPONSIVE
        meta = read_meta_properties(s.data_dir) or {}
        return BrokerStatus(
            state,
            pid,
            s.bootstrap_servers,
            s.kafka_version,
            meta.get("cluster.id"),
            s.data_dir,
            s.log_file,
        )

    def start(self) -> BrokerStatus:
        """Start the broker (assembling jars and formatting storage on first use) and return
        once it answers metadata requests. Raises a BrokerError subclass with the reason."""
        s = self.settings
        with _locked(s):
            pid = _read_pid(s)
            if pid is not None and _is_our_broker(pid, s):
                self._wait_ready(pid, None, time.monotonic() + s.start_timeout_s)
                self.progress(f"already running (pid {pid}) on {s.bootstrap_servers}")
                return self.status()
            s.pid_file.unlink(missing_ok=True)  # stale
            java = find_java()
            _check_port_free(s.port, "EMBER_BROKER_PORT")
            _check_port_free(s.controller_port, "EMBER_CONTROLLER_PORT")
            ensure_jars(s, self.progress)
            cluster_id = format_storage(s, java, self.progress)
            s.properties_file.write_text(server_properties(s))
            launched = time.monotonic()
            process = self._launch(java)
            self.progress(
                f"started Kafka {s.kafka_version} (pid {process.pid}, cluster "
                f"{cluster_id}); waiting for it on {s.bootstrap_servers}"
            )
            try:
                self._wait_ready(process.pid, process, launched + s.start_timeout_s)
            except KeyboardInterrupt:  # the start was abandoned: leave no broker behind
                _terminate(process.pid, s.stop_timeout_s)
                s.pid_file.unlink(missing_ok=True)
                raise
            elapsed = time.monotonic() - launched
            self.progress(f"ready after {elapsed:.1f} s")
            log.info(
                "broker.ready",
                pid=process.pid,
                bootstrap=s.bootstrap_servers,
                cluster_id=cluster_id,
                seconds=round(elapsed, 2),
            )
            return self.status()

    def stop(self) -> bool:
        """Stop the broker: SIGTERM to its process group, wait, then SIGKILL. Returns False
        when it was not running."""
        s = self.settings
        with _locked(s):
            pid = _read_pid(s)
            if pid is None or not _is_our_broker(pid, s):
                s.pid_file.unlink(missing_ok=True)
                return False
            self.progress(f"stopping broker (pid {pid})")
            if _terminate(pid, s.stop_timeout_s):
                _adopt_cds_dump(s)
            cds_dump(s).unlink(missing_ok=True)  # killed mid-dump: incomplete
            s.pid_file.unlink(missing_ok=True)
            log.info("broker.stopped", pid=pid)
            return True

    def _launch(self, java: Java) -> subprocess.Popen[bytes]:
        s = self.settings
        if s.log_file.exists() and s.log_file.stat().st_size:
            s.log_file.replace(s.log_file.with_suffix(".log.1"))
        cds_dump(s).unlink(missing_ok=True)  # left by a broker that did not stop cleanly
        command = _java_command(java, s, MAIN_CLASS, _cds_flags(s, java))
        command.append(str(s.properties_file))
        log.info("broker.launch", command=command)
        with open(s.log_file, "wb") as out:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=s.kafka_dir,
                start_new_session=True,
                close_fds=True,
            )
        s.pid_file.write_text(f"{process.pid}\n")
        return process

    def _wait_ready(
        self, pid: int, process: subprocess.Popen[bytes] | None, deadline: float
    ) -> None:
        """Block until the broker answers, it exits, or the deadline passes."""
        s = self.settings
        while True:
            exited = process.poll() is not None if process else not _is_alive(pid)
            if exited:
                code = process.returncode if process else None
                s.pid_file.unlink(missing_ok=True)
                raise BrokerStartError(
                    f"the broker exited during start (exit code {code}); the log below says "
                    f"why, full log: {s.log_file}",
                    log_excerpt(s.log_file),
                )
            if _accepts_tcp(s.port) and is_reachable(s.kafka_settings(), 3.0):
                return
            if time.monotonic() >= deadline:
                if process is None:  # started by someone else: report, do not kill
                    raise BrokerStartError(
                        f"the broker (pid {pid}) runs but does not answer on "
                        f"{s.bootstrap_servers}: `ember broker stop` and start it again; full "
                        f"log: {s.log_file}",
                        log_excerpt(s.log_file),
                    )
                _terminate(pid, s.stop_timeout_s)
                s.pid_file.unlink(missing_ok=True)
                raise BrokerStartError(
                    f"the broker did not answer on {s.bootstrap_servers} within "
                    f"{s.start_timeout_s:.0f} s and was stopped; the log below may say why, full "
                    f"log: {s.log_file}",
                    log_excerpt(s.log_file),
                )
            time.sleep(0.25)
