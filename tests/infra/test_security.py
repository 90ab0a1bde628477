"""Kafka security end to end: TLS and SASL/SCRAM by configuration alone, ACLs per component,
and no prompt or output text in any component's logs.

One broker serves the module, on free ports with a private EMBER_HOME (only the jar cache is
shared): the usual loopback PLAINTEXT listener plus a SASL_SSL listener whose certificate
this module's own CA signed (tests/security_helpers.py), SCRAM-SHA-512 users stored at
format time, and ACLs (StandardAuthorizer) that give each component what README.md
(Security) lists. Every Ember client here is built by `KafkaSettings.from_env(env)` from
EMBER_* variables only: nothing in Ember is told it runs on a secured cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgpack
import pytest
import pytest_asyncio
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import TopicAuthorizationFailedError

from infra import cli as cli_mod
from infra.broker import BrokerSettings, LocalBroker, SaslSslListener, server_properties
from infra.handshake import connection_problem
from infra.logs import configure_logging
from infra.settings import KafkaSettings, SettingsError
from infra.topics import apply_topics
from schemas import DeadLetter, Request, decode, record_for
from schemas.topics import DEADLETTERS, REQUESTS, TopicSpec, all_topics, model_topic_name
from tests.security_helpers import Pki, component_acls, create_acls, make_pki

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny"
REPLY = "ember.replies.svc-a"  # client service A's own reply topic
STREAMS_GROUP = "ember-streams"
ADMIN, WORKER, STREAMS, CLIENT, OUTSIDER = (
    "ember-admin",
    "ember-worker",
    "ember-streams",
    "ember-client",
    "ember-outsider",  # authenticates, holds no ACL
)
CANARY = f"canary-{uuid.uuid4().hex[:12]}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class SecureCluster:
    broker: BrokerSettings
    pki: Pki
    passwords: dict[str, str]

    @property
    def bootstrap(self) -> str:
        assert self.broker.sasl_ssl is not None
        return self.broker.sasl_ssl.bootstrap_servers

    def env(
        self,
        user: str,
        *,
        password: str | None = None,
        cafile: Path | None = None,
        bootstrap: str | None = None,
        protocol: str = "SASL_SSL",
    ) -> dict[str, str]:
        """The EMBER_* variables of a component that runs as `user`."""
        return {
            "EMBER_BOOTSTRAP_SERVERS": bootstrap or self.bootstrap,
            "EMBER_KAFKA_SECURITY_PROTOCOL": protocol,
            "EMBER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "EMBER_KAFKA_SASL_USERNAME": user,
            "EMBER_KAFKA_SASL_PASSWORD": password or self.passwords[user],
            "EMBER_KAFKA_SSL_CAFILE": str(cafile or self.pki.ca),
        }

    def kafka(self, user: str) -> KafkaSettings:
        return KafkaSettings.from_env(self.env(user))


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureCluster]:
    tmp = tmp_path_factory.mktemp("secure")
    pki = make_pki(tmp / "pki")
    passwords = {u: secrets.token_urlsafe(18) for u in (ADMIN, WORKER, STREAMS, CLIENT, OUTSIDER)}
    listener = SaslSslListener(
        port=_free_port(),
        keystore=pki.broker_keystore,
        scram_users=tuple(passwords.items()),
        acls=True,
        super_users=(ADMIN,),
    )
    settings = BrokerSettings(
        home=tmp / "home",
        cache=BrokerSettings.from_env().cache,
        port=_free_port(),
        controller_port=_free_port(),
        heap="256m",
        start_timeout_s=120.0,
        sasl_ssl=listener,
    )
    broker = LocalBroker(settings)
    broker.start()
    try:
        yield SecureCluster(settings, pki, passwords)
    finally:
        broker.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def cluster(secure_broker: SecureCluster) -> SecureCluster:
    """The broker with Ember's topics (applied as the admin, over SASL_SSL) and the ACLs."""
    admin = secure_broker.kafka(ADMIN)
    await apply_topics(admin, [*all_topics([MODEL]), TopicSpec(REPLY, 1)])
    await create_acls(admin, component_acls(WORKER, STREAMS, CLIENT, REPLY, STREAMS_GROUP))
    return secure_broker


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gpu_worker.make_model import make_model

    return make_model("tiny", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Callable[[list[str]], int]:
    """`ember ARGS` in process, leaving the test session's logging configuration alone."""
    monkeypatch.setattr(cli_mod, "configure_logging", lambda *args, **kwargs: None)
    return cli_mod.main


def _use_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name in list(os.environ):
        if name.startswith("EMBER_KAFKA_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def request(model: str, prompt: str, max_tokens: int = 8, **fields: Any) -> Request:
    values: dict[str, Any] = {
        "request_id": f"sec-{uuid.uuid4().hex[:12]}",
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "reply_topic": REPLY,
        "submitted_at": now_ms(),
    }
    return Request(**(values | fields))


async def _read_all(
    kafka: KafkaSettings, topic: str, timeout_s: float, until: Callable[[Any], bool]
) -> list[Any]:
    """Records of every partition of `topic` from the start, until one satisfies `until` or
    the timeout."""
    partitions = {spec.name: spec.partitions for spec in all_topics([MODEL])}[topic]
    consumer = AIOKafkaConsumer(
        **kafka.aiokafka_kwargs(), enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        records: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while not any(map(until, records)) and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=300)
            records += [r for batch in batches.values() for r in batch]
        return records
    finally:
        await consumer.stop()


# -- the listener's settings (no broker) ----------------------------------------------------


def test_server_properties_add_a_sasl_ssl_listener(tmp_path: Path) -> None:
    plain = BrokerSettings(tmp_path, tmp_path, port=19092, controller_port=19093)
    assert "SASL" not in server_properties(plain) and "authorizer" not in server_properties(plain)
    listener = SaslSslListener(
        19094, tmp_path / "keystore.pem", (("admin", "admin-secret"),), True, ("admin",)
    )
    props = dict(
        line.split("=", 1)
        for line in server_properties(replace(plain, sasl_ssl=listener)).splitlines()
        if line and not line.startswith("#")
    )
    assert props["listeners"] == (
        "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093,SASL_SSL://127.0.0.1:19094"
    )
    assert props["advertised.listeners"].endswith(",SASL_SSL://127.0.0.1:19094")
    assert props["listener.security.protocol.map"].endswith(",SASL_SSL:SASL_SSL")
    assert props["inter.broker.listener.name"] == "PLAINTEXT"
    assert props["listener.name.sasl_ssl.ssl.keystore.type"] == "PEM"
    assert props["listener.name.sasl_ssl.ssl.keystore.location"] == str(listener.keystore)
    assert props["listener.name.sasl_ssl.sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert props["super.users"] == "User:ANONYMOUS;User:admin"
    assert "admin-secret" not in server_properties(replace(plain, sasl_ssl=listener))


@pytest.mark.parametrize(
    ("listener", "match"),
    [
        (dict(port=0), "SASL_SSL listener port"),
        (dict(port=19092), "also the broker's"),
        (dict(scram_users=(("bad name", "long-enough"),)), "SCRAM user name"),
        (dict(scram_users=(("alice", "short"),)), "SCRAM password of 'alice'"),
        (dict(scram_users=(("alice", "has]bracket,comma"),)), "SCRAM password"),
    ],
)
def test_sasl_ssl_listener_settings_are_checked(
    tmp_path: Path, listener: dict[str, Any], match: str
) -> None:
    with pytest.raises(SettingsError, match=match):
        BrokerSettings(
            tmp_path,
            tmp_path,
            port=19092,
            controller_port=19093,
            sasl_ssl=SaslSslListener(**{"port": 19094, "keystore": tmp_path, **listener}),
        )


# -- configuration: topics, the CLI and its errors -----------------------------------------


@pytest.mark.kafka
def test_cli_applies_topics_over_sasl_ssl(
    cluster: SecureCluster,
    cli: Callable[[list[str]], int],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _use_env(monkeypatch, cluster.env(ADMIN))
    assert cli(["topics", "apply", "--model", MODEL]) == 0
    out = capsys.readouterr().out
    assert f"on {cluster.bootstrap}: 0 created, 8 ok, 0 drift" in out


@pytest.mark.kafka
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong password", ["SASL authentication as", "EMBER_KAFKA_SASL_PASSWORD"]),
        ("unknown user", ["SASL authentication as", "EMBER_KAFKA_SASL_USERNAME"]),
        ("untrusted CA", ["is not trusted", "EMBER_KAFKA_SSL_CAFILE"]),
        ("TLS to a plaintext port", ["TLS handshake", "EMBER_KAFKA_SECURITY_PROTOCOL"]),
        ("plaintext to the TLS port", ["closed the connection", "EMBER_KAFKA_SECURITY_PROTOCOL"]),
        ("TLS without SASL", ["closed the connection", "EMBER_KAFKA_SECURITY_PROTOCOL"]),
        ("another SASL mechanism", ["SCRAM-SHA-256", "EMBER_KAFKA_SASL_MECHANISM"]),
    ],
)
def test_connection_errors_are_one_actionable_line(
    cluster: SecureCluster,
    cli: Callable[[list[str]], int],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    case: str,
    expected: list[str],
) -> None:
    env = {
        "wrong password": cluster.env(ADMIN, password="not-the-password"),
        "unknown user": cluster.env("nobody", password="whatever-password"),
        "untrusted CA": cluster.env(ADMIN, cafile=cluster.pki.other_ca),
        "TLS to a plaintext port": cluster.env(ADMIN, bootstrap=cluster.broker.bootstrap_servers),
        "plaintext to the TLS port": {
            "EMBER_BOOTSTRAP_SERVERS": cluster.bootstrap,
            "EMBER_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
        },
        "TLS without SASL": cluster.env(ADMIN, protocol="SSL"),
        "another SASL mechanism": {
            **cluster.env(ADMIN),
            "EMBER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
        },
    }[case]
    _use_env(monkeypatch, env)
    started = time.monotonic()
    assert cli(["topics", "apply"]) == 1
    assert time.monotonic() - started < 30
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ember topics apply: "), captured.err
    for text in expected:
        assert text in lines[0]
    assert cluster.passwords[ADMIN] not in captured.err


@pytest.mark.kafka
async def test_connection_problem_is_none_for_good_settings(cluster: SecureCluster) -> None:
    for user in (ADMIN, WORKER, OUTSIDER):
        assert await connection_problem(cluster.kafka(user)) is None


# -- ACLs ----------------------------------------------------------------------------------


@pytest.mark.kafka
async def test_ember_messages_round_trip_under_acls(cluster: SecureCluster) -> None:
    """The client writes a request, the streams principal reads it back, byte for byte."""
    sent = request("round-trip-model", "hello over TLS")
    producer = AIOKafkaProducer(**cluster.kafka(CLIENT).aiokafka_kwargs(), acks="all")
    await producer.start()
    try:
        rec = record_for(sent)
        await producer.send_and_wait(rec.topic, rec.value, key=rec.key, headers=rec.headers)
    finally:
        await producer.stop()
    records = await _read_all(
        cluster.kafka(STREAMS), REQUESTS, 10, until=lambda r: r.key == rec.key
    )
    got = [decode(Request, r.value, r.headers) for r in records if r.key == rec.key]
    assert got == [sent]


@pytest.mark.kafka
@pytest.mark.parametrize(
    ("user", "topic"),
    [
        (OUTSIDER, REQUESTS),  # authenticated, but no ACL at all
        (WORKER, REQUESTS),  # a worker never writes requests
        (CLIENT, model_topic_name(MODEL)),  # clients go through admission
        (CLIENT, "ember.lifecycle"),  # nor fake worker events
    ],
)
async def test_acls_refuse_writes_a_component_was_not_granted(
    cluster: SecureCluster, user: str, topic: str
) -> None:
    producer = AIOKafkaProducer(**cluster.kafka(user).aiokafka_kwargs(), request_timeout_ms=10_000)
    await producer.start()
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            await producer.send_and_wait(topic, b"\x80", key=b"k")
    finally:
        await producer.stop()


@pytest.mark.kafka
async def test_acls_refuse_reads_a_component_was_not_granted(cluster: SecureCluster) -> None:
    """A client reads its own reply topic only: not the requests it wrote, not the shared
    default reply topic, not a model topic (aiokafka fetches nothing from a topic the broker
    does not authorize; it logs instead of raising)."""
    producer = AIOKafkaProducer(**cluster.kafka(ADMIN).aiokafka_kwargs(), acks="all")
    await producer.start()
    try:
        # partition 1 of the model topic: the worker of the serving test reads partition 0
        for topic, partition in ((REPLY, 0), ("ember.replies", 0), (model_topic_name(MODEL), 1)):
            await producer.send_and_wait(topic, b"\x80", key=b"probe", partition=partition)
    finally:
        await producer.stop()
    client = cluster.kafka(CLIENT)
    reply = AIOKafkaConsumer(
        **client.aiokafka_kwargs(), enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await reply.start()
    try:
        reply.assign([TopicPartition(REPLY, 0)])
        assert await reply.getmany(timeout_ms=10_000)
    finally:
        await reply.stop()
    for topic, partition in (("ember.replies", 0), (model_topic_name(MODEL), 1)):
        consumer = AIOKafkaConsumer(
            **client.aiokafka_kwargs(), enable_auto_commit=False, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            consumer.assign([TopicPartition(topic, partition)])
            assert await consumer.getmany(timeout_ms=1500) == {}
        finally:
            await consumer.stop()


# -- the serving path over SASL_SSL, and the log canary -------------------------------------


@contextlib.contextmanager
def captured_logs(level: str = "DEBUG") -> Iterator[io.StringIO]:
    """This process's logs (structlog and stdlib, aiokafka included) as JSON lines in a
    buffer, as `configure_logging` sets them up; the previous setup is restored after.

    aiokafka logs whole records at DEBUG ("Sending (key=... value=b'...prompt...')"), so
    configure_logging must keep it at WARNING or above whatever the level asked for."""
    root = logging.getLogger()
    noisy = [logging.getLogger(n) for n in ("aiokafka", "kafka", "faust", "mode")]
    saved = (root.handlers[:], root.level, [n.level for n in noisy], structlog.get_config())
    stream = io.StringIO()
    configure_logging("security-test", level=level, stream=stream)
    assert logging.getLogger("aiokafka").getEffectiveLevel() >= logging.WARNING
    try:
        yield stream
    finally:
        root.handlers[:], level_before, noisy_levels, config = saved
        root.setLevel(level_before)
        for logger, noisy_level in zip(noisy, noisy_levels, strict=True):
            logger.setLevel(noisy_level)
        structlog.contextvars.clear_contextvars()
        structlog.configure(**config)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def assert_no_user_text(name: str, log_text: str, secrets_: list[str]) -> int:
    """None of `secrets_` in the log, raw or as any JSON line's decoded strings. Returns the
    number of lines checked."""
    decoded = []
    for line in log_text.splitlines():
        with contextlib.suppress(ValueError):
            decoded += list(_strings(json.loads(line)))
    haystack = log_text + "\n" + "\n".join(decoded)
    for secret in secrets_:
        if secret in haystack:
            where = next(line for line in log_text.splitlines() if secret in line)
            pytest.fail(f"{name} logs contain user text {secret!r}:\n{where[:2000]}")
    return len(log_text.splitlines())


@dataclass
class StreamsProcess:
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextlib.asynccontextmanager
async def streams_app(cluster: SecureCluster, tmp: Path) -> AsyncIterator[StreamsProcess]:
    """`ember streams` as the streams principal, its logs (JSON, DEBUG) in a file."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("EMBER_KAFKA_")},
        **cluster.env(STREAMS),
        "EMBER_HOME": str(tmp / "home"),
        "EMBER_MODELS": MODEL,
        "EMBER_STREAMS_GROUP": STREAMS_GROUP,
        "EMBER_STREAMS_STORE": "memory://",
        "EMBER_STREAMS_WEB_PORT": str(_free_port()),
        "EMBER_STREAMS_OFFSET_RESET": "earliest",  # a fresh broker: nothing old to replay
        "EMBER_STREAMS_TICK_S": "0.5",
    }
    (tmp / "home").mkdir()  # Faust creates $EMBER_HOME/streams without parents
    log = tmp / "streams.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "infra.cli", "--log-level", "DEBUG", "streams"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield StreamsProcess(proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, 10)


async def _until(
    what: str, done: Callable[[], bool], timeout_s: float, check: Callable[[], None]
) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        check()
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        await asyncio.sleep(0.1)


@pytest.mark.kafka
async def test_request_served_over_sasl_ssl_and_no_text_in_any_log(
    cluster: SecureCluster, tiny_model: Path, tmp_path: Path
) -> None:
    """client (SDK) -> streams (Faust: admission, placement) -> worker -> client, every hop on
    the SASL_SSL listener under its own principal. The prompt carries a canary; the canary and
    the generated text must be absent from the logs of the worker, the SDK and aiokafka (this
    process, DEBUG) and of the streams app (its own process, DEBUG). Malformed input carrying
    the canary goes down the dead-letter paths of admission and of the worker."""
    from gpu_worker.worker import Worker, WorkerConfig
    from schemas.client import EmberClient

    admin = cluster.kafka(ADMIN)
    prompt = f"{CANARY} tell me a story about the sea"
    with captured_logs() as logs:
        async with streams_app(cluster, tmp_path) as streams:

            def streams_alive() -> None:
                if streams.proc.poll() is not None:
                    raise AssertionError(
                        f"ember streams exited {streams.proc.returncode}:\n{streams.tail()}"
                    )

            worker = Worker(
                WorkerConfig(
                    model=MODEL,
                    model_dir=tiny_model,
                    partition=0,
                    worker_id=f"sec-worker-{uuid.uuid4().hex[:6]}",
                    max_batch=4,
                    heartbeat_interval_s=0.5,
                ),
                cluster.kafka(WORKER),
            )
            run = asyncio.create_task(worker.run())

            def worker_alive() -> None:
                streams_alive()
                if run.done():
                    raise AssertionError(f"worker ended: {run.result()} ({worker.state})")

            try:
                await _until("worker ready", lambda: worker.state == "ready", 60, worker_alive)
                async with EmberClient(cluster.kafka(CLIENT), reply_topic=REPLY) as client:
                    sent = request(MODEL, prompt, max_tokens=24)
                    handle = await client.submit(sent)
                    # Malformed input with the canary: bytes that are no msgpack map, and a
                    # request whose field is out of range (dead letter + rejected chunk).
                    bad = request(MODEL, prompt)
                    bad_map = msgpack.unpackb(record_for(bad).value) | {"max_tokens": -5}
                    producer = AIOKafkaProducer(**cluster.kafka(CLIENT).aiokafka_kwargs())
                    await producer.start()
                    try:
                        await producer.send_and_wait(
                            REQUESTS, f"\xc1{CANARY}".encode(), key=b"bad-bytes"
                        )
                        await producer.send_and_wait(
                            REQUESTS, msgpack.packb(bad_map), key=bad.request_id.encode()
                        )
                    finally:
                        await producer.stop()
                    chunks = []

                    async def collect() -> None:
                        async for chunk in handle:
                            if chunk.seq == 0:
                                chunks.clear()
                            chunks.append(chunk)

                    reader = asyncio.create_task(collect())
                    await _until("the reply", reader.done, 60, worker_alive)
                    await reader
                # A malformed record straight on the worker's partition (as a buggy producer
                # with the streams principal's rights would write it).
                raw = AIOKafkaProducer(**admin.aiokafka_kwargs())
                await raw.start()
                try:
                    await raw.send_and_wait(
                        model_topic_name(MODEL),
                        msgpack.packb({"request": {"prompt": CANARY}, "x": CANARY}),
                        key=b"bad-admitted",
                        partition=0,
                    )
                finally:
                    await raw.stop()
                letters: list[DeadLetter] = []

                async def dead_letters() -> None:
                    for record in await _read_all(admin, DEADLETTERS, 1, until=lambda r: False):
                        letter = decode(DeadLetter, record.value, record.headers)
                        if letter not in letters:
                            letters.append(letter)

                def ours() -> int:
                    return sum(CANARY.encode() in (x.value_bytes or b"") for x in letters)

                deadline = time.monotonic() + 30
                while ours() < 3 and time.monotonic() < deadline:
                    worker_alive()
                    await dead_letters()
            finally:
                worker.drain()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(run, 30)
            streams_alive()

    final = chunks[-1]
    assert final.is_last and final.finish_reason in ("stop", "length"), final
    text = "".join(c.text for c in chunks)
    token_ids = [t for c in chunks for t in c.token_ids]
    assert len(token_ids) >= 8 and len(text) >= 8
    ours_letters = [x for x in letters if CANARY.encode() in (x.value_bytes or b"")]
    assert sorted(x.source_topic for x in ours_letters) == sorted(
        [REQUESTS, REQUESTS, model_topic_name(MODEL)]
    )

    user_text = [CANARY, text, ", ".join(map(str, token_ids))]
    ours = logs.getvalue()
    assert_no_user_text("worker/SDK/aiokafka", ours, user_text) > 20
    assert '"event": "worker state"' in ours  # the capture did see the worker
    assert assert_no_user_text("streams", streams.log.read_text(errors="replace"), user_text)


@pytest.mark.kafka
async def test_a_reply_topic_the_worker_may_not_write_does_not_stop_it(
    cluster: SecureCluster, tiny_model: Path
) -> None:
    """Any client can name any reply topic; one outside `ember.replies*` must cost only that
    request (dead letter), never the worker that holds the batch."""
    from gpu_worker.worker import Worker, WorkerConfig
    from schemas import AdmittedRequest

    admin = cluster.kafka(ADMIN)
    await apply_topics(admin, [TopicSpec("other.replies", 1)])  # exists; no ACL for workers
    partition = 2  # the serving test's worker reads partition 0
    worker = Worker(
        WorkerConfig(model=MODEL, model_dir=tiny_model, partition=partition, max_batch=4),
        cluster.kafka(WORKER),
    )
    run = asyncio.create_task(worker.run())
    try:
        await _until("worker ready", lambda: worker.state == "ready", 60, lambda: None)
        producer = AIOKafkaProducer(**admin.aiokafka_kwargs())
        await producer.start()
        try:
            for reply in ("other.replies", REPLY):
                admitted = AdmittedRequest(
                    request=request(MODEL, "hello", reply_topic=reply),
                    latency_class="interactive",
                    prompt_tokens=2,
                    prompt_bucket=128,
                    admitted_at=now_ms(),
                )
                rec = record_for(admitted, model_topic_name(MODEL))
                await producer.send_and_wait(
                    rec.topic, rec.value, key=rec.key, headers=rec.headers, partition=partition
                )
        finally:
            await producer.stop()
        await _until("the allowed request served", lambda: worker.served >= 1 or run.done(), 30,
                     lambda: None)  # fmt: skip
        assert not run.done() and worker.state == "ready"
    finally:
        worker.drain()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(run, 30)
