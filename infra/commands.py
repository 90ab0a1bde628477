"""`ember broker start|stop|status` and `ember topics apply`.

    ember broker start            # assemble (first time), format (first time), start, wait
    ember topics apply            # core topics; --model NAME adds that model's request topic
    ember broker status           # exit 0 running, 1 unresponsive, 3 stopped
    ember broker stop

`ember broker start` manages only the local broker: when EMBER_BOOTSTRAP_SERVERS points at
another cluster it says so and starts nothing (exit 0, so setup scripts go on to apply topics
there). `ember topics apply` exits 1 when a topic drifted from its spec, so CI notices.
Errors print one line to stderr (for a failed start, the broker log's tail follows it) and
exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable

from infra.broker import (
    BrokerError,
    BrokerSettings,
    BrokerState,
    LocalBroker,
    targets_local_broker,
)
from infra.settings import KafkaSettings, SettingsError

EXIT_ERROR = 1
EXIT_NOT_RUNNING = 3  # LSB status code for "program is not running"


def _say(message: str) -> None:
    print(message, flush=True)


def _fail(command: str, reason: str, details: str = "") -> int:
    print(f"ember {command}: {reason}", file=sys.stderr, flush=True)
    if details:
        print("\n".join(f"  {line}" for line in details.splitlines()), file=sys.stderr)
    return EXIT_ERROR


def _guarded(
    command: str, handler: Callable[[argparse.Namespace], int]
) -> Callable[[argparse.Namespace], int]:
    """Turn the errors a user can act on into one stderr line and exit code 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except BrokerError as exc:
            return _fail(command, exc.reason, exc.details)
        except SettingsError as exc:
            return _fail(command, str(exc))

    return run


def broker_start(args: argparse.Namespace) -> int:
    kafka, settings = KafkaSettings.from_env(), BrokerSettings.from_env()
    if not targets_local_broker(kafka, settings):
        _say(
            f"EMBER_BOOTSTRAP_SERVERS={kafka.bootstrap_servers} is an external cluster: no local "
            f"broker started. To run one here, unset it or set it to {settings.bootstrap_servers}."
        )
        return 0
    status = LocalBroker(settings, progress=_say).start()
    _say(status.describe())
    return 0


def broker_stop(args: argparse.Namespace) -> int:
    settings = BrokerSettings.from_env()
    stopped = LocalBroker(settings, progress=_say).stop()
    _say("local Kafka broker stopped" if stopped else "local Kafka broker was not running")
    return 0


def broker_status(args: argparse.Namespace) -> int:
    kafka, settings = KafkaSettings.from_env(), BrokerSettings.from_env()
    status = LocalBroker(settings).status()
    _say(status.describe())
    if not targets_local_broker(kafka, settings):
        _say(
            f"note: EMBER_BOOTSTRAP_SERVERS={kafka.bootstrap_servers} points at another "
            "cluster; Ember services use that one, not this broker"
        )
    return {BrokerState.RUNNING: 0, BrokerState.UNRESPONSIVE: EXIT_ERROR}.get(
        status.state, EXIT_NOT_RUNNING
    )


def topics_apply(args: argparse.Namespace) -> int:
    from infra.topics import TopicsError, apply_topics  # aiokafka: only for this command
    from schemas.topics import all_topics

    kafka = KafkaSettings.from_env()
    try:
        report = asyncio.run(apply_topics(kafka, all_topics(args.model, args.replication_factor), dry_run=args.dry_run))
    except TopicsError as exc:
        return _fail("topics apply", str(exc))
    _say(report.describe())
    if report.drifted:
        return _fail(
            "topics apply",
            f"{len(report.drifted)} topic(s) differ from their spec: {', '.join(report.drifted)}",
        )
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    broker = sub.add_parser(
        "broker", help="the local Kafka broker (KRaft, plain java)", description=__doc__
    )
    actions = broker.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, handler, help_text in (
        ("start", broker_start, "start the local broker and wait until it answers"),
        ("stop", broker_stop, "stop the local broker (SIGTERM, then SIGKILL)"),
        ("status", broker_status, "show the local broker's state, address and files"),
    ):
        parser = actions.add_parser(name, help=help_text)
        parser.set_defaults(func=_guarded(f"broker {name}", handler))

    topics = sub.add_parser("topics", help="Ember's Kafka topics (schemas/topics.py)")
    topic_actions = topics.add_subparsers(dest="action", metavar="ACTION", required=True)
    apply = topic_actions.add_parser(
        "apply",
        help="create missing topics, report drift; never alters or deletes",
        description="Create the core topics (and per-model request topics) that are missing "
        "on EMBER_BOOTSTRAP_SERVERS; report existing topics that differ from their spec. "
        "Exit 1 on drift.",
    )
    apply.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME",
        help="also the request topic of model NAME (repeatable)",
    )
    apply.add_argument(
        "--replication-factor",
        type=int,
        default=1,
        help="replicas of each topic on a multi-broker cluster (default: 1)",
    )
    apply.add_argument("--dry-run", action="store_true", help="report only, create nothing")
    apply.set_defaults(func=_guarded("topics apply", topics_apply))
