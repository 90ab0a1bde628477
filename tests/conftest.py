"""Shared fixtures: a real Kafka broker, reachable at the configured bootstrap servers.

`kafka_settings` (session) makes sure a broker answers at EMBER_BOOTSTRAP_SERVERS, starting
the local one through infra.broker when that address is the local broker's and nothing
answers (it is left running for the next session), and applies the core topics. No broker is
a test failure, never a skip.

Event loop: pyproject sets asyncio_mode=auto with one session-wide loop for fixtures and
tests, so async fixtures of any scope and async tests share a loop (aiokafka clients made in
a session fixture stay usable in every test). `event_loop` returns that loop for code that
still takes one as a parameter.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
import pytest_asyncio

from infra.broker import (
    BrokerError,
    BrokerSettings,
    LocalBroker,
    is_reachable,
    targets_local_broker,
)
from infra.settings import KafkaSettings
from infra.topics import apply_topics
from schemas.topics import core_topics


def _ensure_broker(settings: KafkaSettings) -> None:
    if is_reachable(settings, timeout_s=5.0):
        return
    broker = BrokerSettings.from_env()
    if not targets_local_broker(settings, broker):
        pytest.fail(
            f"no Kafka broker answers at EMBER_BOOTSTRAP_SERVERS={settings.bootstrap_servers}: "
            "start that cluster, or unset the variable to let the tests start a local broker",
            pytrace=False,
        )
    try:
        LocalBroker(broker).start()
    except BrokerError as exc:
        pytest.fail(f"could not start the local Kafka broker: {exc}", pytrace=False)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def kafka_settings() -> KafkaSettings:
    """Client settings of a running broker that has Ember's core topics."""
    settings = KafkaSettings.from_env()
    await asyncio.to_thread(_ensure_broker, settings)
    report = await apply_topics(settings, core_topics())
    if report.drifted:
        pytest.fail(
            f"core topics differ from schemas/topics.py on {settings.bootstrap_servers}:\n"
            f"{report.describe()}",
            pytrace=False,
        )
    return settings


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def event_loop() -> asyncio.AbstractEventLoop:
    """The session's running loop (pytest-asyncio >= 1.0 no longer provides this fixture)."""
    return asyncio.get_running_loop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the broker (the `kafka_settings` fixture, directly or through
    another fixture) is marked `kafka`, so `-m "not kafka"` runs only tests that need none."""
    for item in items:
        if "kafka_settings" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kafka)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """A test that configures logging (to a captured stream) must not leave its handlers to
    the next one: a handler on a closed stream prints 'Logging error' into later output."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
