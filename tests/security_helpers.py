"""Security fixtures for tests: certificates made with the `openssl` CLI, and ACLs.

    pki = make_pki(tmp_path)          # ca.pem, broker-keystore.pem, other-ca.pem
    SaslSslListener(port, pki.broker_keystore, ...)
    KafkaSettings(..., ssl_cafile=str(pki.ca))
    await create_acls(admin_settings, component_acls("ember-worker", ...))

The broker certificate names 127.0.0.1 and localhost (subjectAltName), so clients verify the
hostname as they would in production. `other_ca` signed nothing the broker holds: a client
that trusts only it must refuse the broker. Keys are RSA 2048, unencrypted PKCS#8 (what
Kafka's PEM keystore reads without `ssl.key.password`), valid for two days.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.admin import CreateAclsRequest, DescribeAclsRequest

from infra.settings import KafkaSettings

DAYS = "2"


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA certificate clients trust (EMBER_KAFKA_SSL_CAFILE)
    broker_keystore: Path  # broker key + certificate + CA certificate, one PEM file
    other_ca: Path  # a CA that signed nothing here


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()[-2000:]}")


def _make_ca(directory: Path, name: str, subject: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", DAYS,
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", subject,
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip


def make_pki(directory: Path) -> Pki:
    """Write a CA, a broker keystore signed by it, and an unrelated CA under `directory`."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl CLI is needed to make test certificates")
    directory.mkdir(parents=True, exist_ok=True)
    _make_ca(directory, "ca", "/CN=Ember test CA")
    _make_ca(directory, "other-ca", "/CN=Ember unrelated CA")
    (directory / "broker.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-sha256",
        "-keyout", "broker.key", "-out", "broker.csr", "-subj", "/CN=localhost",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-sha256", "-days", DAYS, "-extfile", "broker.ext",
        "-out", "broker.pem",
        cwd=directory,
    )  # fmt: skip
    keystore = directory / "broker-keystore.pem"
    keystore.write_text(
        "".join((directory / name).read_text() for name in ("broker.key", "broker.pem", "ca.pem"))
    )
    keystore.chmod(0o600)
    for key in ("ca.key", "other-ca.key", "broker.key"):
        (directory / key).chmod(0o600)
    return Pki(directory / "ca.pem", keystore, directory / "other-ca.pem")


# -- ACLs ------------------------------------------------------------------------------------

# Kafka's wire codes (org.apache.kafka.common.resource / acl).
RESOURCE_TYPES = {"topic": 2, "group": 3, "cluster": 4}
PATTERN_LITERAL, PATTERN_PREFIXED = 3, 4
OPERATIONS = {
    "all": 2,
    "read": 3,
    "write": 4,
    "create": 5,
    "delete": 6,
    "alter": 7,
    "describe": 8,
    "describe_configs": 10,
}
PERMISSION_ALLOW = 3


@dataclass(frozen=True)
class Acl:
    """ALLOW `operations` on one resource to User:`user`, from any host."""

    user: str
    resource: str  # topic, group or cluster
    name: str  # resource name, or its prefix when `prefixed`
    operations: tuple[str, ...]
    prefixed: bool = False

    def describe(self) -> str:
        star = "*" if self.prefixed else ""
        ops = ", ".join(op.replace("_", "-") for op in self.operations)
        return f"User:{self.user} | {self.resource} {self.name}{star} | {ops}"


def component_acls(
    worker: str, streams: str, client: str, reply_topic: str, streams_group: str
) -> list[Acl]:
    """What each Ember component needs (README.md, Security, mirrors this list).

    Reply topics share the prefix `ember.replies` so that one ACL lets workers and the control
    plane answer on any of them, while each client service reads only its own."""
    return [
        # gpu worker: its model's partition in, chunks / lifecycle / dead letters out.
        Acl(worker, "topic", "ember.model.", ("read",), prefixed=True),
        Acl(worker, "group", "ember.worker.", ("read",), prefixed=True),  # offset commits
        Acl(worker, "topic", "ember.replies", ("write",), prefixed=True),
        Acl(worker, "topic", "ember.lifecycle", ("write",)),
        Acl(worker, "topic", "ember.workers", ("write",)),
        Acl(worker, "topic", "ember.deadletters", ("write",)),
        # streams (Faust): requests and worker events in; admitted, placed, decisions out.
        Acl(streams, "topic", "ember.requests", ("read",)),
        Acl(streams, "topic", "ember.admitted", ("read", "write")),
        Acl(streams, "topic", "ember.lifecycle", ("read",)),
        Acl(streams, "topic", "ember.model.", ("write",), prefixed=True),
        Acl(streams, "topic", "ember.decisions", ("write",)),
        Acl(streams, "topic", "ember.deadletters", ("write",)),
        Acl(streams, "topic", "ember.replies", ("write",), prefixed=True),
        # `ember streams` checks the topics it joins before starting
        Acl(streams, "topic", "ember.", ("describe", "describe_configs"), prefixed=True),
        # the app's own topics (changelogs, deferred requests) and its consumer group
        Acl(streams, "topic", streams_group, ("all",), prefixed=True),
        Acl(streams, "group", streams_group, ("read",)),
        # a client service: requests out, its own reply topic in (no consumer group).
        Acl(client, "topic", "ember.requests", ("write",)),
        Acl(client, "topic", reply_topic, ("read",)),
    ]


async def create_acls(kafka: KafkaSettings, acls: list[Acl], timeout_s: float = 15.0) -> None:
    """Create `acls` (aiokafka's admin client has no ACL calls: CreateAcls requests on its
    low-level client) and wait until the broker's authorizer lists all of them."""
    client = AIOKafkaClient(**kafka.aiokafka_kwargs(), client_id="ember-test-acls")
    await client.bootstrap()
    try:
        node = client.get_random_node()
        wanted = 0
        for acl in acls:
            for op in acl.operations:
                request = CreateAclsRequest(
                    resource_type=RESOURCE_TYPES[acl.resource],
                    resource_name=acl.name,
                    resource_pattern_type_filter=PATTERN_PREFIXED
                    if acl.prefixed
                    else PATTERN_LITERAL,
                    principal=f"User:{acl.user}",
                    host="*",
                    operation=OPERATIONS[op],
                    permission_type=PERMISSION_ALLOW,
                )
                response = await client.send(node, request)
                for result in response.to_object()["creation_responses"]:
                    if result["error_code"] != 0:
                        raise RuntimeError(
                            f"CreateAcls {acl.describe()} ({op}): error {result['error_code']} "
                            f"{result['error_message']}"
                        )
                wanted += 1
        deadline = time.monotonic() + timeout_s
        while (seen := await _count_acls(client, node)) < wanted:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the broker lists {seen} of {wanted} ACLs after {timeout_s} s")
            await asyncio.sleep(0.1)
    finally:
        await client.close()


async def _count_acls(client: AIOKafkaClient, node: int) -> int:
    any_ = 1  # ANY for resource type, pattern, operation and permission
    request = DescribeAclsRequest(
        resource_type=any_,
        resource_name=None,  # type: ignore[arg-type]  # null: any name
        resource_pattern_type_filter=any_,
        principal=None,  # type: ignore[arg-type]
        host=None,  # type: ignore[arg-type]
        operation=any_,
        permission_type=any_,
    )
    response = (await client.send(node, request)).to_object()
    if response["error_code"] != 0:
        raise RuntimeError(f"DescribeAcls: error {response['error_code']}")
    return sum(len(resource["acls"]) for resource in response["resources"])
