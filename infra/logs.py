"""One structlog JSON configuration for every Ember component.

Prompt text, output text and token ids never reach a log line: `scrub_sensitive` runs on every
event, before rendering, and replaces any such field (at any depth) with a size summary.
Call `configure_logging(component)` once at process start; then `get_logger(__name__)`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import structlog

# Field names whose values are user content. Matched case-insensitively on the key.
SENSITIVE_KEYS = frozenset(
    {
        "prompt",
        "prompt_text",
        "prompt_ids",
        "prompt_token_ids",
        "text",
        "text_delta",
        "delta",
        "output",
        "output_text",
        "completion",
        "token_ids",
        "tokens",
        "stop",
        "stop_strings",
        "messages",
        "original",
        "raw",
        "value_bytes",
    }
)
REDACTED = "[redacted]"


def _summary(value: Any) -> str:
    try:
        return f"{REDACTED} len={len(value)}"
    except TypeError:
        return REDACTED


def _scrub(value: Any, depth: int = 0) -> Any:
    if depth > 8:
        return REDACTED
    if isinstance(value, Mapping):
        return {
            k: (_summary(v) if str(k).lower() in SENSITIVE_KEYS else _scrub(v, depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_scrub(v, depth + 1) for v in value]
    return value


def scrub_sensitive(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: drop user content from every event, whatever its nesting."""
    return _scrub(event_dict)


def configure_logging(component: str, level: str = "INFO", stream: TextIO | None = None) -> None:
    """JSON lines on stderr (or `stream`), one per event, with component, level and timestamp.

    Standard-library loggers (aiokafka, faust, mode) are routed through the same pipeline so
    their records are JSON and scrubbed too.
    """
    stream = stream or sys.stderr
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        scrub_sensitive,
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "kafka", "faust", "mode"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(component=component)


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
