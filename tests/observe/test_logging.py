"""Structured logging: one record per event with its fields, LogCalls, JSON lines, redaction of everything logged."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from typing import Any

import pytest

from resilient_dspy import CircuitBreaker, Pipeline, RetriesExhaustedError, Retry, Timeout
from resilient_dspy.events import Event
from resilient_dspy.observe import JsonFormatter, LogCalls, LoggingListener, RedactingFilter, Redactor
from tests.observe import AlwaysFailing, Scripted, captured_json, server_error

SECRETS = ("sk-proj-Abc123def456GHI789jkl0", "bob@example.com", "+44 20 7946 0958", "hunter2hunter2")
LEAKY = f"upstream said: key {SECRETS[0]} for {SECRETS[1]}, call {SECRETS[2]}, password={SECRETS[3]}"


def records(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if "__raw__" not in line]


def raw(lines: list[dict[str, Any]]) -> str:
    return next(line["__raw__"] for line in lines if "__raw__" in line)


async def test_each_event_is_one_record_with_every_field_in_extra() -> None:
    program = Scripted(server_error("boom"))
    pipeline = Pipeline(program, Retry(3, base_delay=0.5, jitter="none"), name="qa", listeners=[LoggingListener()])
    with captured_json() as lines:
        await pipeline("q")
    [record] = records(lines)
    assert record["level"] == "INFO"
    assert record["logger"] == "resilient_dspy"
    assert record["event"] == "RetryScheduled"
    assert record["pipeline"] == "qa"
    assert record["layer"] == "Retry"
    assert isinstance(record["event_time"], float)
    assert record["attempt"] == 1
    assert record["delay"] == 0.5
    assert record["reason"] == "LMServerError"
    assert record["error"] == {"type": "LMServerError", "message": "boom"}
    assert record["message"].startswith("RetryScheduled pipeline=qa layer=Retry")


async def test_levels_per_event_and_disabled_levels_build_nothing() -> None:
    pipeline = Pipeline(
        AlwaysFailing(),
        Retry(2, base_delay=0.1, jitter="none"),
        listeners=[LoggingListener(levels={"RetryScheduled": logging.DEBUG, "RetryGaveUp": logging.ERROR})],
    )
    with captured_json(level=logging.INFO) as lines, pytest.raises(RetriesExhaustedError):
        await pipeline("q")
    assert [(r["event"], r["level"]) for r in records(lines)] == [("RetryGaveUp", "ERROR")]


async def test_default_levels_warn_on_give_up() -> None:
    pipeline = Pipeline(AlwaysFailing(), Retry(2, base_delay=0.1), listeners=[LoggingListener()])
    with captured_json() as lines, pytest.raises(RetriesExhaustedError):
        await pipeline("q")
    assert [(r["event"], r["level"]) for r in records(lines)] == [
        ("RetryScheduled", "INFO"),
        ("RetryGaveUp", "WARNING"),
    ]


async def test_any_event_is_logged_generically() -> None:
    @dataclass(frozen=True, slots=True, kw_only=True)
    class ChaosInjected(Event):
        fault: str
        detail: dict[str, Any]

    listener = LoggingListener()
    with captured_json() as lines:
        listener(
            ChaosInjected(pipeline="p", layer="Chaos", time=1.0, fault="latency", detail={"s": 2, "who": "a@b.io"})
        )
    [record] = records(lines)
    assert record["event"] == "ChaosInjected"
    assert record["fault"] == "latency"
    assert record["detail"] == {"s": 2, "who": "[REDACTED]"}


@pytest.mark.parametrize("formatter_redacts", [False, True])
async def test_secrets_in_errors_inputs_and_keys_never_reach_the_log(formatter_redacts: bool) -> None:
    """Our records are redacted by the listener itself; a redacting formatter also cleans other code's records
    (here the breaker's own warning, which shows the partition key)."""
    breaker = CircuitBreaker(1, break_duration=60, key=lambda call: call.inputs["question"])
    pipeline = Pipeline(
        AlwaysFailing(LEAKY),
        LogCalls(),
        Timeout(30),
        Retry(2, base_delay=0.1),
        breaker,
        listeners=[LoggingListener()],
    )
    question = f"my email is {SECRETS[1]} and my key is {SECRETS[0]}"
    redactor = Redactor() if formatter_redacts else None
    with captured_json(redactor=redactor) as lines, pytest.raises(RetriesExhaustedError):
        await pipeline(question)  # the 60 s break outlasts the 30 s deadline: Retry gives up at once
    ours = [r for r in records(lines) if "event" in r]
    text = raw(lines) if formatter_redacts else json.dumps(ours)
    for secret in SECRETS:
        assert secret not in text
    if not formatter_redacts:
        assert SECRETS[0] in raw(lines), (
            "the breaker's own log shows the key: this is what a redacting formatter is for"
        )
    events = [r["event"] for r in ours]
    assert events == ["CircuitStateChanged", "RetryGaveUp", "CallFinished"]
    call = ours[-1]
    assert call["inputs"] == {"question": "my email is [REDACTED] and my key is [REDACTED]"}
    assert call["outcome"] == "error"
    assert call["error"]["type"] == "RetriesExhaustedError"
    assert "[REDACTED]" in call["error"]["message"]


async def test_log_calls_success_record() -> None:
    pipeline = Pipeline(Scripted(server_error()), LogCalls(inputs=False), Retry(3, base_delay=0.2), name="qa")
    with captured_json("resilient_dspy.calls") as lines:
        await pipeline("hello")
    [record] = records(lines)
    assert record["level"] == "INFO"
    assert (record["outcome"], record["attempts"], record["retries"], record["served_by"]) == (
        "success",
        2,
        1,
        "primary",
    )
    assert record["duration"] >= 0
    assert "inputs" not in record


async def test_log_calls_costs_nothing_when_the_logger_is_off() -> None:
    logging.getLogger("resilient_dspy.calls.off").setLevel(logging.CRITICAL)
    pipeline = Pipeline(Scripted(), LogCalls("resilient_dspy.calls.off"))
    with captured_json("resilient_dspy.calls.off", level=logging.CRITICAL) as lines:
        assert await pipeline("hello") == "ok"
    assert records(lines) == []


def test_json_formatter_one_object_per_line_with_extras_and_exception() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(static={"service": "qa-api"}))
    logger = logging.getLogger("test.json_formatter")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("hello %s", "world", extra={"tenant": "t1", "nested": {"a": [1, 2]}})
        try:
            raise ValueError("bad\nthing")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "hello world"
    assert first["level"] == "WARNING"
    assert first["logger"] == "test.json_formatter"
    assert first["timestamp"].endswith("+00:00")
    assert (first["tenant"], first["nested"], first["service"]) == ("t1", {"a": [1, 2]}, "qa-api")
    assert second["exception"]["type"] == "ValueError"
    assert second["exception"]["message"] == "bad\nthing"
    assert "Traceback" in second["exception"]["traceback"]


def test_json_formatter_with_redactor_cleans_foreign_records() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(redactor=Redactor()))
    logger = logging.getLogger("test.json_formatter.redacting")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise RuntimeError(f"token {SECRETS[0]}")
        except RuntimeError:
            logger.exception("user %s", SECRETS[1], extra={"phone": SECRETS[2]})
    finally:
        logger.removeHandler(handler)
    output = stream.getvalue()
    for secret in SECRETS[:3]:
        assert secret not in output
    assert json.loads(output)["phone"] == "[REDACTED]"


def test_redacting_filter_for_plain_text_handlers() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(logging.Formatter("%(message)s %(user)s"))
    logger = logging.getLogger("test.redacting_filter")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise RuntimeError(f"token {SECRETS[0]}")
        except RuntimeError:
            logger.exception("key %s", SECRETS[0], extra={"user": SECRETS[1]})
    finally:
        logger.removeHandler(handler)
    output = stream.getvalue()
    assert SECRETS[0] not in output
    assert SECRETS[1] not in output
    assert output.startswith("key [REDACTED] [REDACTED]")
