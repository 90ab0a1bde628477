"""infra/deploy without Docker: the files parse, every EMBER_* variable they set is one Ember
documents, Kafka UI's MessagePack serde covers Ember's topics, and the commands the services
run are commands `ember` accepts."""

from __future__ import annotations

import ast
import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.cli import build_parser
from schemas.topics import REPLIES, all_topics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "infra" / "deploy"
# Modules whose docstrings document the settings Ember reads from the environment.
SETTINGS_DOCS = ["infra/settings.py", "streams/app.py", "infra/broker.py",
                 "infra/supervisor/commands.py"]
EMBER_VAR = re.compile(r"\bEMBER_[A-Z0-9_]+\b")
REFERENCE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def load(name: str) -> Any:
    return yaml.safe_load((DEPLOY / name).read_text())


def documented_variables() -> set[str]:
    found: set[str] = set()
    for path in SETTINGS_DOCS:
        doc = ast.get_docstring(ast.parse((ROOT / path).read_text())) or ""
        found |= set(EMBER_VAR.findall(doc))
    return found


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key] = value
    return pairs


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with the defaults, and `$$` -> `$`."""
    return REFERENCE.sub(lambda m: m[2] or "", value).replace("$$", "$")


def compose() -> dict[str, Any]:
    return load("compose.yaml")


def test_files_parse_and_name_the_services():
    services = compose()["services"]
    assert {"kafka", "kafka-ui", "topics", "streams", "supervisor"} <= set(services)
    assert set(load("compose.gpu.yaml")["services"]) <= set(services)
    assert load("kafka-ui.yaml")["kafka"]["clusters"][0]["name"]


def test_kafka_is_a_single_kraft_node_without_auto_created_topics():
    kafka = compose()["services"]["kafka"]
    env = kafka["environment"]
    assert interpolate(kafka["image"]).startswith("apache/kafka:4.")
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == 1
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == 1
    assert env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == 0
    cluster_id = interpolate(env["CLUSTER_ID"])
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", cluster_id), "a 16-byte base64url cluster id"


def test_every_ember_variable_is_documented_and_in_the_env_example():
    documented = documented_variables()
    assert {"EMBER_BOOTSTRAP_SERVERS", "EMBER_MODELS", "EMBER_STREAMS_GROUP"} <= documented
    example = env_example()
    for name in ("compose.yaml", "compose.gpu.yaml", ".env.example", "Dockerfile"):
        used = set(EMBER_VAR.findall((DEPLOY / name).read_text()))
        assert used <= documented, f"{name}: undocumented {sorted(used - documented)}"
    for name in ("compose.yaml", "compose.gpu.yaml"):
        referenced = {m[1] for m in REFERENCE.finditer((DEPLOY / name).read_text())}
        missing = referenced - set(example)
        assert not missing, f"{name}: not in .env.example: {sorted(missing)}"


def test_ember_services_share_the_kafka_settings():
    services = compose()["services"]
    kafka_vars = {v for v in documented_variables() if v.startswith(("EMBER_KAFKA_", "EMBER_BOOT"))}
    kafka_vars -= {"EMBER_KAFKA_DATA_DIR", "EMBER_KAFKA_CLUSTER_ID"}  # the local broker's own
    for name in ("topics", "streams", "supervisor", "worker", "cli"):
        env = services[name]["environment"]
        assert kafka_vars <= set(env), f"{name} misses {kafka_vars - set(env)}"
    ui = services["kafka-ui"]["environment"]
    assert "EMBER_BOOTSTRAP_SERVERS" in ui["KAFKA_CLUSTERS_0_BOOTSTRAPSERVERS"]


def test_kafka_ui_reads_every_ember_topic_with_the_messagepack_serde():
    ui = compose()["services"]["kafka-ui"]
    assert interpolate(ui["image"]).startswith("ghcr.io/kafbat/kafka-ui")
    location = ui["environment"]["SPRING_CONFIG_ADDITIONAL-LOCATION"]
    assert any(v.endswith(f"kafka-ui.yaml:{location}:ro") for v in ui["volumes"])
    cluster = load("kafka-ui.yaml")["kafka"]["clusters"][0]
    serdes = {s["name"]: s for s in cluster["serde"]}
    values = re.compile(serdes["MessagePack"]["topicValuesPattern"])
    keys = re.compile(serdes["String"]["topicKeysPattern"])
    topics = [t.name for t in all_topics(["tiny", "org/llama-7b"])]
    topics += [f"{REPLIES}.backend-7", "ember-streams-deferred"]
    for topic in topics:  # kafbat matches the whole name (Matcher.matches)
        assert values.fullmatch(topic), f"{topic}: values not shown as MessagePack"
        assert keys.fullmatch(topic), f"{topic}: keys not shown as text"
    assert not values.fullmatch("__consumer_offsets")


def command_of(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return [interpolate(str(part)) for part in command]


@pytest.mark.parametrize("name", ["streams", "supervisor", "cli"])
def test_service_commands_are_ember_commands(name: str):
    args = command_of(compose()["services"][name])
    if args != ["--help"]:
        build_parser().parse_args(args)


def fake_ember(tmp_path: Path) -> dict[str, str]:
    """PATH with an `ember` that prints its arguments, one per line."""
    exe = tmp_path / "ember"
    exe.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}


def run_shell_service(name: str, tmp_path: Path, env: dict[str, str]) -> list[str]:
    service = compose()["services"][name]
    assert service["entrypoint"] == ["sh", "-c"]
    [script] = command_of(service)
    done = subprocess.run(["sh", "-c", script], env={**fake_ember(tmp_path), **env},
                          capture_output=True, text=True, check=True)
    args = done.stdout.splitlines()
    build_parser().parse_args(args)
    return args


def test_the_topics_job_applies_a_topic_per_model(tmp_path: Path):
    args = run_shell_service(
        "topics", tmp_path,
        {"EMBER_MODELS": "tiny=/models/tiny,org/llama=/models/llama",
         "TOPICS_REPLICATION_FACTOR": "3"},
    )
    assert args == ["topics", "apply", "--replication-factor", "3",
                    "--model", "tiny", "--model", "org/llama"]


def test_the_static_worker_serves_the_first_model(tmp_path: Path):
    args = run_shell_service(
        "worker", tmp_path,
        {"EMBER_MODELS": "tiny=/models/tiny,other=/models/other", "WORKER_DEVICE": "cpu"},
    )
    assert args == ["worker", "/models/tiny", "--model", "tiny", "--partition", "0",
                    "--device", "cpu"]


def test_the_dockerfile_copies_the_packages_and_runs_ember():
    text = (DEPLOY / "Dockerfile").read_text()
    copied = re.findall(r"^COPY (\S+) ", text, re.MULTILINE)
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: no such path"
    assert {"schemas", "streams", "gpu_worker", "infra"} <= set(copied)
    assert 'ENTRYPOINT ["ember"]' in text
