"""The local broker: settings, preflight errors, and a real start/stop/restart cycle.

Broker tests run their own broker on free ports with a private EMBER_HOME (sharing only the
jar cache), so the session's shared broker is never disturbed.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from infra import broker as broker_mod
from infra import cli as cli_mod
from infra.broker import (
    BrokerSettings,
    BrokerStartError,
    BrokerState,
    DataDirError,
    JavaError,
    LocalBroker,
    MavenError,
    PortInUseError,
    check_data_dir,
    find_java,
    format_storage,
    generate_cluster_id,
    read_meta_properties,
    server_properties,
    targets_local_broker,
)
from infra.settings import KafkaSettings, SettingsError
from infra.topics import apply_topics
from schemas.topics import TopicSpec


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Callable[[list[str]], int]:
    """`ember ARGS` in process, leaving the test session's logging configuration alone."""
    monkeypatch.setattr(cli_mod, "configure_logging", lambda *args, **kwargs: None)
    return cli_mod.main


@pytest.fixture
def own_broker(tmp_path: Path) -> BrokerSettings:
    """Settings of a private broker: free ports, data and logs under tmp_path, shared jars."""
    shared = BrokerSettings.from_env()
    return BrokerSettings(
        home=tmp_path / "home",
        cache=shared.cache,
        port=_free_port(),
        controller_port=_free_port(),
        heap="256m",
        start_timeout_s=120.0,
    )


def _jvms_using(settings: BrokerSettings) -> list[int]:
    """Pids of every process whose command line names this broker's server.properties."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(settings.properties_file) in cmdline and "kafka.Kafka" in cmdline:
                pids.append(int(proc.name))
    return pids


def _write_meta(data_dir: Path, **values: str) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    lines = ["#written by a test"] + [f"{k.replace('_', '.')}={v}" for k, v in values.items()]
    (data_dir / "meta.properties").write_text("\n".join(lines) + "\n")


# -- settings and pure helpers -------------------------------------------------------------


def test_settings_from_env_defaults_and_overrides(tmp_path: Path) -> None:
    defaults = BrokerSettings.from_env({"EMBER_HOME": str(tmp_path)})
    assert (defaults.port, defaults.controller_port) == (9092, 9093)
    assert defaults.data_dir == tmp_path / "kafka" / "data"
    assert defaults.bootstrap_servers == "127.0.0.1:9092"
    cid = generate_cluster_id()
    custom = BrokerSettings.from_env(
        {
            "EMBER_HOME": str(tmp_path),
            "EMBER_CACHE_DIR": str(tmp_path / "c"),
            "EMBER_BROKER_PORT": "19092",
            "EMBER_CONTROLLER_PORT": "19093",
            "EMBER_KAFKA_DATA_DIR": str(tmp_path / "d"),
            "EMBER_KAFKA_CLUSTER_ID": cid,
            "EMBER_BROKER_HEAP": "1g",
        }
    )
    assert custom.port == 19092 and custom.controller_port == 19093
    assert custom.data_dir == tmp_path / "d" and custom.cluster_id == cid
    assert custom.libs_dir == tmp_path / "c" / f"kafka-{broker_mod.KAFKA_VERSION}" / "libs"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"EMBER_BROKER_PORT": "nine"}, "EMBER_BROKER_PORT"),
        ({"EMBER_CONTROLLER_PORT": "70000"}, "EMBER_CONTROLLER_PORT"),
        ({"EMBER_BROKER_PORT": "9093"}, "EMBER_CONTROLLER_PORT"),
        ({"EMBER_BROKER_HEAP": "lots"}, "EMBER_BROKER_HEAP"),
        ({"EMBER_KAFKA_CLUSTER_ID": "short"}, "EMBER_KAFKA_CLUSTER_ID"),
    ],
)
def test_settings_errors_name_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(SettingsError, match=names):
        BrokerSettings.from_env(env)


def test_cluster_ids_look_like_kafkas() -> None:
    ids = {generate_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)


@pytest.mark.parametrize(
    ("bootstrap", "protocol", "local"),
    [
        ("127.0.0.1:9092", "PLAINTEXT", True),
        ("localhost:9092", "PLAINTEXT", True),
        ("127.0.0.1:9094", "PLAINTEXT", False),
        ("kafka.internal:9092", "PLAINTEXT", False),
        ("127.0.0.1:9092,127.0.0.1:9095", "PLAINTEXT", False),
        ("127.0.0.1:9092", "SSL", False),
    ],
)
def test_targets_local_broker(bootstrap: str, protocol: str, local: bool, tmp_path: Path) -> None:
    kafka = KafkaSettings(bootstrap_servers=bootstrap, security_protocol=protocol)
    assert targets_local_broker(kafka, BrokerSettings(tmp_path, tmp_path)) is local


def test_server_properties_single_node_kraft(tmp_path: Path) -> None:
    settings = BrokerSettings(tmp_path, tmp_path, port=19092, controller_port=19093)
    props = dict(
        line.split("=", 1)
        for line in server_properties(settings).splitlines()
        if line and not line.startswith("#")
    )
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19093"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["log.dirs"] == str(tmp_path / "kafka" / "data")
    assert props["auto.create.topics.enable"] == "false"
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["group.initial.rebalance.delay.ms"] == "0"


def test_data_dir_checks(tmp_path: Path) -> None:
    settings = BrokerSettings(tmp_path, tmp_path, data_dir=tmp_path / "data")
    assert check_data_dir(settings) is None  # absent: will be formatted
    (tmp_path / "data").mkdir()
    assert check_data_dir(settings) is None  # empty: will be formatted

    cid = generate_cluster_id()
    _write_meta(settings.data_dir, version="1", node_id="1", cluster_id=cid)
    assert check_data_dir(settings) == cid
    assert read_meta_properties(settings.data_dir) == {
        "version": "1",
        "node.id": "1",
        "cluster.id": cid,
    }

    _write_meta(settings.data_dir, version="1", node_id="2", cluster_id=cid)
    with pytest.raises(DataDirError, match="belongs to Kafka node 2"):
        check_data_dir(settings)

    _write_meta(settings.data_dir, version="0", broker_id="1", cluster_id=cid)
    with pytest.raises(DataDirError, match="not a KRaft"):
        check_data_dir(settings)

    (settings.data_dir / "meta.properties").unlink()
    (settings.data_dir / "stray.log").write_text("x")
    with pytest.raises(DataDirError, match="no meta.properties"):
        check_data_dir(settings)


def test_missing_java_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(JavaError, match="java not found.*JAVA_HOME"):
        find_java({})


def test_old_java_is_reported(tmp_path: Path) -> None:
    java = tmp_path / "jdk" / "bin" / "java"
    java.parent.mkdir(parents=True)
    java.write_text("#!/bin/sh\necho 'openjdk version \"11.0.21\" 2023-10-17' >&2\n")
    java.chmod(java.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(JavaError, match="is Java 11; .* needs Java 17"):
        find_java({"JAVA_HOME": str(tmp_path / "jdk")})
    java.write_text("#!/bin/sh\necho 'java version \"1.8.0_392\"' >&2\n")
    with pytest.raises(JavaError, match="is Java 8"):
        find_java({"JAVA_HOME": str(tmp_path / "jdk")})


def test_missing_maven_is_reported_only_without_cached_jars(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    settings = BrokerSettings(tmp_path / "home", tmp_path / "cache")
    with pytest.raises(MavenError, match="mvn not found"):
        broker_mod.ensure_jars(settings, lambda _: None)
    settings.libs_dir.mkdir(parents=True)
    (settings.libs_dir / f"kafka_2.13-{settings.kafka_version}.jar").write_bytes(b"")
    assert broker_mod.ensure_jars(settings, lambda _: None) == settings.libs_dir


FAKE_MVN = """#!/bin/sh
for arg in "$@"; do
  case "$arg" in
    -DoutputDirectory=*) out="${arg#-DoutputDirectory=}" ;;
    -Dkafka.version=*) version="${arg#-Dkafka.version=}" ;;
  esac
done
url="https://repo.example/k/kafka_2.13-$version.jar"
echo "[INFO] Downloaded from central: $url (2.1 MB at 9 MB/s)"
if [ -n "$FAIL" ]; then echo "[ERROR] Could not resolve dependencies"; exit 1; fi
mkdir -p "$out" && touch "$out/kafka_2.13-$version.jar" "$out/kafka-clients-$version.jar"
"""


def test_jars_are_assembled_by_maven_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mvn").write_text(FAKE_MVN)
    (bin_dir / "mvn").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    settings = BrokerSettings(tmp_path / "home", tmp_path / "cache", kafka_version="9.9.9")

    monkeypatch.setenv("FAIL", "1")
    with pytest.raises(MavenError, match="Maven could not assemble Kafka 9.9.9") as caught:
        broker_mod.ensure_jars(settings, lambda _: None)
    assert "Could not resolve dependencies" in caught.value.details
    assert not settings.libs_dir.exists()
    assert list(settings.libs_dir.parent.iterdir()) == []  # no staging left behind

    monkeypatch.delenv("FAIL")
    lines: list[str] = []
    assert broker_mod.ensure_jars(settings, lines.append) == settings.libs_dir
    assert sorted(p.name for p in settings.libs_dir.iterdir()) == [
        "kafka-clients-9.9.9.jar",
        "kafka_2.13-9.9.9.jar",
    ]
    assert "  downloaded kafka_2.13-9.9.9.jar (2.1 MB)" in lines
    assert lines[-1].startswith("assembled 2 jars")
    assert [p.name for p in settings.libs_dir.parent.iterdir()] == ["libs"]


def test_status_and_stop_of_a_broker_never_started(own_broker: BrokerSettings) -> None:
    broker = LocalBroker(own_broker)
    status = broker.status()
    assert status.state is BrokerState.STOPPED and status.pid is None
    assert status.cluster_id is None
    assert broker.stop() is False


def test_cli_start_with_external_cluster_starts_nothing(
    cli: Callable[[list[str]], int],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("EMBER_BOOTSTRAP_SERVERS", "kafka-1.example:9092,kafka-2.example:9092")
    monkeypatch.setenv("EMBER_HOME", str(tmp_path))
    assert cli(["broker", "start"]) == 0
    assert "external cluster: no local broker started" in capsys.readouterr().out
    assert not (tmp_path / "kafka" / "broker.pid").exists()


# -- a real broker -------------------------------------------------------------------------


@pytest.mark.kafka
async def test_restart_keeps_data_and_leaves_no_jvm(own_broker: BrokerSettings) -> None:
    broker = LocalBroker(own_broker)
    kafka = own_broker.kafka_settings()
    topic = "ember.test.restart"
    values = [f"value-{i}".encode() for i in range(5)]
    try:
        first = broker.start()
        assert first.state is BrokerState.RUNNING and first.pid is not None
        assert first.cluster_id is not None
        assert broker.start().pid == first.pid  # idempotent: the same JVM
        await apply_topics(kafka, [TopicSpec(topic, 2)])
        producer = AIOKafkaProducer(**kafka.aiokafka_kwargs(), acks="all")
        await producer.start()
        try:
            for i, value in enumerate(values):
                await producer.send_and_wait(topic, value, key=f"k{i}".encode())
        finally:
            await producer.stop()

        assert broker.stop() is True
        assert not own_broker.pid_file.exists()
        assert _jvms_using(own_broker) == []
        assert broker.status().state is BrokerState.STOPPED

        second = broker.start()
        assert second.cluster_id == first.cluster_id
        assert second.pid != first.pid
        consumer = AIOKafkaConsumer(
            topic,
            **kafka.aiokafka_kwargs(),
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
        )
        await consumer.start()
        try:
            got: list[bytes] = []
            while len(got) < len(values):
                batch = await consumer.getmany(timeout_ms=10_000)
                assert batch, f"only {len(got)} of {len(values)} messages came back"
                got += [record.value for records in batch.values() for record in records]
        finally:
            await consumer.stop()
        assert sorted(got) == sorted(values)
    finally:
        broker.stop()
    assert _jvms_using(own_broker) == []
    assert not own_broker.pid_file.exists()


@pytest.mark.kafka
def test_data_dir_of_another_cluster_is_refused(own_broker: BrokerSettings) -> None:
    java = find_java()
    broker_mod.ensure_jars(own_broker, lambda _: None)
    formatted_for = format_storage(own_broker, java, lambda _: None)
    assert read_meta_properties(own_broker.data_dir)["cluster.id"] == formatted_for  # type: ignore[index]

    other = generate_cluster_id()
    pinned = BrokerSettings(
        own_broker.home,
        own_broker.cache,
        own_broker.port,
        own_broker.controller_port,
        cluster_id=other,
    )
    with pytest.raises(DataDirError) as caught:
        LocalBroker(pinned).start()
    assert formatted_for in caught.value.reason and other in caught.value.reason
    assert "EMBER_KAFKA_DATA_DIR" in caught.value.reason
    assert not pinned.pid_file.exists()
    # The data is untouched: the matching id still starts from it.
    assert (
        check_data_dir(BrokerSettings(own_broker.home, own_broker.cache, cluster_id=formatted_for))
        == formatted_for
    )


@pytest.mark.kafka
@pytest.mark.parametrize("which", ["port", "controller_port"])
def test_port_taken_by_another_process(own_broker: BrokerSettings, which: str) -> None:
    port = getattr(own_broker, which)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with pytest.raises(PortInUseError) as caught:
            LocalBroker(own_broker).start()
    reason = caught.value.reason
    assert f"port {port}" in reason and f"pid {os.getpid()}" in reason
    assert ("EMBER_BROKER_PORT" if which == "port" else "EMBER_CONTROLLER_PORT") in reason
    assert not own_broker.pid_file.exists()


@pytest.mark.kafka
def test_broker_exiting_during_start_shows_its_log(own_broker: BrokerSettings) -> None:
    broker_mod.ensure_jars(own_broker, lambda _: None)
    format_storage(own_broker, find_java(), lambda _: None)
    doomed = BrokerSettings(
        own_broker.home,
        own_broker.cache,
        own_broker.port,
        own_broker.controller_port,
        heap="1k",  # the JVM refuses to start with a heap this small
    )
    with pytest.raises(BrokerStartError) as caught:
        LocalBroker(doomed).start()
    assert "exited during start" in caught.value.reason
    assert str(doomed.log_file) in caught.value.reason
    assert "heap" in caught.value.details.lower()
    assert not doomed.pid_file.exists()
    assert _jvms_using(doomed) == []


@pytest.mark.kafka
def test_cli_broker_lifecycle(
    cli: Callable[[list[str]], int],
    own_broker: BrokerSettings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("EMBER_HOME", str(own_broker.home))
    monkeypatch.setenv("EMBER_BROKER_PORT", str(own_broker.port))
    monkeypatch.setenv("EMBER_CONTROLLER_PORT", str(own_broker.controller_port))
    monkeypatch.setenv("EMBER_BOOTSTRAP_SERVERS", own_broker.bootstrap_servers)
    try:
        assert cli(["broker", "status"]) == 3
        assert cli(["broker", "start"]) == 0
        assert "local Kafka broker: running" in capsys.readouterr().out
        assert cli(["broker", "status"]) == 0
        assert cli(["topics", "apply", "--model", "org/tiny"]) == 0
        out = capsys.readouterr().out
        assert "created  ember.model.org_tiny" in out and "0 drift" in out
    finally:
        assert cli(["broker", "stop"]) == 0
    assert "stopped" in capsys.readouterr().out
    assert cli(["broker", "status"]) == 3
