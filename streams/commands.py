"""`ember streams`: run the control plane (admission, placement, tables, autoscaler).

    EMBER_MODELS=tiny ember streams                   # models from the environment
    ember streams --model tiny --policy always_on --web-port 6066
    curl -s 127.0.0.1:6066/ember/models/ ; curl -s 127.0.0.1:6066/metrics

Before Faust starts, the command applies Ember's topics (the core ones and each served
model's request topic; idempotent, never destructive) and refuses to start when a control
topic's partition count drifted from schemas/topics.py (the app joins them by partition).
Options override the EMBER_* variables documented in streams/app.py. Runs until SIGINT or
SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys

from infra.settings import SettingsError

# option dest -> environment variable it sets
_ENV = {
    "group": "EMBER_STREAMS_GROUP",
    "store": "EMBER_STREAMS_STORE",
    "web_host": "EMBER_STREAMS_WEB_HOST",
    "web_port": "EMBER_STREAMS_WEB_PORT",
    "policy": "EMBER_AUTOSCALER_POLICY",
    "config": "EMBER_STREAMS_CONFIG",
    "tick_s": "EMBER_STREAMS_TICK_S",
    "offset_reset": "EMBER_STREAMS_OFFSET_RESET",
}


def _fail(reason: str) -> int:
    print(f"ember streams: {reason}", file=sys.stderr, flush=True)
    return 1


def _check_store(store: str) -> str | None:
    """Why `store` cannot be used here, or None."""
    if store.startswith("rocksdb:"):
        if not (importlib.util.find_spec("rocksdict") or importlib.util.find_spec("rocksdb")):
            return (
                f"EMBER_STREAMS_STORE={store} needs RocksDB bindings: `pip install rocksdict` "
                "(or faust-streaming[rocksdb]); or use memory://"
            )
    elif not store.startswith(("memory:", "aerospike:")):
        return f"EMBER_STREAMS_STORE={store}: expected memory://, rocksdb:// or aerospike://"
    return None


async def _apply_topics(settings: object) -> str | None:
    """Apply core and model topics; a reason to stop, or None."""
    from infra.topics import TopicsError, apply_topics
    from schemas.topics import CONTROL_PARTITIONS, all_topics

    kafka = settings.kafka  # type: ignore[attr-defined]
    specs = all_topics(settings.models, settings.replication_factor)  # type: ignore[attr-defined]
    try:
        report = await apply_topics(kafka, specs)
    except TopicsError as exc:
        return str(exc)
    print(report.describe(), flush=True)
    control = {s.name for s in specs if s.partitions == CONTROL_PARTITIONS}
    bad = [
        plan.name
        for plan in report.plans
        if plan.name in control and any(d.setting == "partitions" for d in plan.drift)
    ]
    if bad:
        return (
            f"{', '.join(bad)} must have {CONTROL_PARTITIONS} partitions (the streams app "
            "joins them by partition); recreate them or fix schemas/topics.py"
        )
    return None


def _use_event_loop(name: str) -> str | None:
    """Install the event loop the worker runs on: `uvloop` (libuv: cheaper callbacks, tasks
    and socket writes, the bulk of the per-record cost), `asyncio`, or `auto` (uvloop when it
    is installed). Before the worker exists, which makes its loop. The name used, or None for
    an unknown name (or uvloop asked for but not installed)."""
    if name not in ("auto", "uvloop", "asyncio"):
        return None
    if name != "asyncio" and importlib.util.find_spec("uvloop") is not None:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return "uvloop"
    return None if name == "uvloop" else "asyncio"


def run_streams(args: argparse.Namespace) -> int:
    for dest, variable in _ENV.items():
        value = getattr(args, dest, None)
        if value is not None:
            os.environ[variable] = str(value)
    if args.model:
        known = [m for m in os.environ.get("EMBER_MODELS", "").split(",") if m.strip()]
        os.environ["EMBER_MODELS"] = ",".join([*known, *args.model])
    try:
        from streams.app import SETTINGS, app  # reads the environment set above
    except SettingsError as exc:
        return _fail(str(exc))
    reason = _check_store(SETTINGS.store)
    if reason is None and not SETTINGS.models:
        reason = "no models to serve: set EMBER_MODELS or pass --model NAME"
    if reason is None and not args.skip_topics:
        reason = asyncio.run(_apply_topics(SETTINGS))
    if reason is not None:
        return _fail(reason)
    try:  # Faust creates its data directory without parents (a fresh EMBER_HOME)
        SETTINGS.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _fail(f"cannot create the streams data directory {SETTINGS.data_dir}: {exc}")

    import faust

    import streams.agents  # noqa: F401  (registers the agents and the timer)
    import streams.web  # noqa: F401  (registers the pages)

    loop = _use_event_loop(os.environ.get("EMBER_STREAMS_LOOP", "auto"))
    if loop is None:
        return _fail("EMBER_STREAMS_LOOP: expected auto, uvloop or asyncio")
    worker = faust.Worker(
        app,
        loglevel=args.log_level,
        quiet=True,
        redirect_stdouts=False,
        override_logging=False,
    )
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "streams",
        help="the control plane: admission, placement, tables, autoscaler (Faust)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", action="append", default=[], metavar="NAME",
        help="a served model (repeatable; added to EMBER_MODELS)",
    )
    parser.add_argument("--group", help="Faust app id / consumer group (EMBER_STREAMS_GROUP)")
    parser.add_argument("--store", help="memory:// or rocksdb:// (EMBER_STREAMS_STORE)")
    parser.add_argument("--web-host", help="web server address (EMBER_STREAMS_WEB_HOST)")
    parser.add_argument("--web-port", type=int, help="0: no web (EMBER_STREAMS_WEB_PORT)")
    parser.add_argument(
        "--policy", help="ember_predictive, fully_cold, always_on or knative_reactive"
    )
    parser.add_argument("--config", help="JSON file of per-model limits (EMBER_STREAMS_CONFIG)")
    parser.add_argument("--tick-s", type=float, help="timer interval (EMBER_STREAMS_TICK_S)")
    parser.add_argument(
        "--offset-reset", choices=("latest", "earliest"),
        help="where a new consumer group starts (EMBER_STREAMS_OFFSET_RESET)",
    )
    parser.add_argument(
        "--skip-topics", action="store_true",
        help="do not apply Ember's topics before starting",
    )
    parser.set_defaults(func=run_streams)
