"""Generate the tables of docs/PROTOCOL.md from the message classes, so the doc cannot drift.

The doc holds blocks between `<!-- generated:NAME -->` and `<!-- /generated -->`; NAME is
`topics`, `routes`, `limits` or a schema name (`request`, `token_chunk`, ...).

    python -m schemas.docgen docs/PROTOCOL.md          # rewrite the blocks in place
    python -m schemas.docgen --check docs/PROTOCOL.md  # exit 1 when they are stale
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from schemas import limits
from schemas.fields import REQUIRED, FieldSpec, field_specs
from schemas.messages import MESSAGE_TYPES, Message
from schemas.topics import MODEL_TOPIC_PARTITIONS, TopicSpec, core_topics, model_topic

_BLOCK = re.compile(r"(<!-- generated:(\w+) -->\n)(.*?)(<!-- /generated -->)", re.DOTALL)


def _default(fs: FieldSpec) -> str:
    if fs.default is REQUIRED:
        return ""
    value = fs.default_value()
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, tuple):
        return "`[]`"
    if isinstance(value, dict):
        return "`{}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def field_table(cls: type[Message]) -> str:
    schema = cls.SCHEMA
    rows = [
        "| field | msgpack type | required | default | constraints and meaning |",
        "|---|---|---|---|---|",
        f'| `v` | str | yes |  | `"{schema.version}"` written; any `{schema.major}.x` read |',
    ]
    for fs in field_specs(cls):
        notes = "; ".join(part for part in (fs.check.describe(), fs.doc) if part)
        required = "yes" if fs.required else "no"
        rows.append(
            f"| `{fs.name}` | {_cell(fs.check.wire)} | {required} | {_default(fs)} "
            f"| {_cell(notes)} |"
        )
    return "\n".join(rows)


def routes_table() -> str:
    rows = [
        "| schema | `ember-schema` header | topic | record key |",
        "|---|---|---|---|",
    ]
    for cls in MESSAGE_TYPES.values():
        schema = cls.SCHEMA
        for route in schema.routes:
            topic = "the request's `reply_topic`" if route.topic == "*" else f"`{route.topic}`"
            rows.append(f"| `{schema.name}` | `{schema.header_value}` | {topic} | `{route.key}` |")
    return "\n".join(rows)


def _retention(spec: TopicSpec) -> str:
    if spec.configs.get("cleanup.policy") == "compact":
        return "compacted"
    hours = int(spec.configs.get("retention.ms", "0")) // 3_600_000
    return f"{hours // 24} d" if hours >= 24 and hours % 24 == 0 else f"{hours} h"


def topics_table() -> str:
    rows = ["| topic | partitions | retention | holds |", "|---|---|---|---|"]
    example = model_topic("{model}", MODEL_TOPIC_PARTITIONS)
    for spec in [*core_topics(), example]:
        name = spec.name.replace("_model_", "{model}")
        rows.append(f"| `{name}` | {spec.partitions} | {_retention(spec)} | {spec.description} |")
    return "\n".join(rows)


def limits_table() -> str:
    rows = ["| limit | value |", "|---|---|"]
    for name in dir(limits):
        if name.startswith(("MAX_", "INT")):
            rows.append(f"| `{name}` | {getattr(limits, name)} |")
    return "\n".join(rows)


def block(name: str) -> str:
    if name == "routes":
        return routes_table()
    if name == "limits":
        return limits_table()
    if name == "topics":
        return topics_table()
    return field_table(MESSAGE_TYPES[name])


def render(text: str) -> str:
    """`text` with every generated block replaced by its current content."""
    return _BLOCK.sub(lambda m: f"{m[1]}{block(m[2])}\n{m[4]}", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text = args.path.read_text()
    fresh = render(text)
    if args.check:
        if fresh != text:
            print(f"{args.path}: generated tables are stale; run python -m schemas.docgen")
            return 1
        return 0
    args.path.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
