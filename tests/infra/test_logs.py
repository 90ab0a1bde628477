"""Logs are JSON lines with component and level, and never carry prompt or output text."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from infra.logs import configure_logging, get_logger
from schemas import Request, TokenChunk

CANARY = "canary-7f3a9c"
CANARY_ID = 987_654_321  # a token id that must not show up either


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    configure_logging("test-component", level="DEBUG", stream=stream)
    yield stream
    root.handlers[:], saved_level = saved
    root.setLevel(saved_level)
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert records, "nothing was logged"
    for record in records:
        assert record["component"] == "test-component"
        assert record["level"] in {"debug", "info", "warning", "error", "critical"}
        assert "timestamp" in record and "event" in record
    return records


def assert_clean(stream: io.StringIO) -> None:
    output = stream.getvalue()
    assert CANARY not in output
    assert str(CANARY_ID) not in output


def test_top_level_content_fields_are_redacted(log_stream: io.StringIO) -> None:
    get_logger("t").info(
        "request_admitted",
        request_id="r-1",
        prompt=CANARY,
        text=CANARY,
        token_ids=[CANARY_ID, 1],
        prompt_token_ids=[CANARY_ID],
        stop=[CANARY],
        Prompt=CANARY,  # keys match case-insensitively
        note="visible-marker",
    )
    [record] = lines(log_stream)
    assert_clean(log_stream)
    assert record["event"] == "request_admitted" and record["request_id"] == "r-1"
    assert record["level"] == "info"
    assert record["prompt"].startswith("[redacted]")
    assert record["note"] == "visible-marker"  # other fields do get through


def test_nested_content_fields_are_redacted(log_stream: io.StringIO) -> None:
    get_logger("t").warning(
        "batch_step",
        request={"prompt": CANARY, "meta": {"token_ids": [CANARY_ID], "model": "tiny"}},
        chunks=[{"text": CANARY, "seq": 0}, {"text_delta": CANARY}],
        deep={"a": {"b": {"c": [{"output": CANARY}]}}},
    )
    [record] = lines(log_stream)
    assert_clean(log_stream)
    assert record["level"] == "warning"
    assert record["request"]["meta"]["model"] == "tiny" and record["chunks"][0]["seq"] == 0


def test_stdlib_loggers_with_extra_are_redacted(log_stream: io.StringIO) -> None:
    logging.getLogger("ember.test").error(
        "decode failed",
        extra={"prompt": CANARY, "token_ids": [CANARY_ID], "payload": {"text": CANARY}},
    )
    [record] = lines(log_stream)
    assert_clean(log_stream)
    assert record["event"] == "decode failed" and record["level"] == "error"


def test_logged_messages_show_no_content(log_stream: io.StringIO) -> None:
    request = Request(request_id="r-1", model="tiny", submitted_at=0, prompt=CANARY, stop=(CANARY,))
    chunk = TokenChunk(
        request_id="r-1",
        seq=0,
        text=CANARY,
        token_ids=(CANARY_ID,),
        submitted_at=0,
        emitted_at=1,
        worker_id="w-1",
        warm=True,
    )
    log = get_logger("t")
    log.info("placed", request=request, chunk=chunk)
    log.debug("as_map", request=request.to_map(), chunk=chunk.to_map())
    records = lines(log_stream)
    assert len(records) == 2
    assert_clean(log_stream)
    assert "r-1" in records[0]["request"]  # the repr still says which request
