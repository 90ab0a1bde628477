"""`ember`: one console entry point; each package adds its own subcommands.

Each of `infra.commands`, `gpu_worker.commands` and `streams.commands` exposes
`add_commands(subparsers)`, which registers parsers whose `func(args) -> int` runs the command.
Heavy imports (torch, faust) stay inside the handlers so `ember broker status` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from infra.logs import configure_logging

COMMAND_MODULES = (
    "infra.commands",
    "infra.demo",
    "infra.generate",
    "infra.supervisor.commands",
    "gpu_worker.commands",
    "streams.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--log-level", default=os.environ.get("EMBER_LOG_LEVEL", "INFO"), help="default: INFO"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(f"cli.{args.command}", args.log_level)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
